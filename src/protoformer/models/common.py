"""What the language models share: token-id checks and the parameter (re)initialisation rule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from protoformer.config import TransformerConfig, size_problem
from protoformer.jsonio import clip
from protoformer.parallel.groups import ProcessGroups
from protoformer.parallel.layers import ColumnParallelLinear
from protoformer.parallel.protocols import InitMethod

__all__ = ["RESIDUAL_OUTPUT_LINEARS", "check_sizes", "check_token_ids", "output_layer",
           "reinitialize_parameters"]

# Linears that write into the residual stream; initialised with std / sqrt(2 * num_layers).
RESIDUAL_OUTPUT_LINEARS = ("linear_proj", "linear_fc2")


def check_sizes(model: str, **sizes: int) -> None:
    """A ValueError unless every size (e.g. `vocab_size`, `max_sequence_length`) is an int >= 1
    and at most its bound in `protoformer.config.MAX_SIZES` (where it has one)."""
    for name, value in sizes.items():
        problem = size_problem(name, value)
        if problem is not None:
            raise ValueError(f"{model}: {name}={clip(repr(value))} {problem}")


def check_token_ids(model: str, name: str, ids: Tensor, vocab_size: int) -> None:
    """A clear error unless `ids` is a non-empty `[batch, sequence]` tensor of ids in the vocabulary.

    The range is checked for CPU tensors only: on an accelerator it would synchronise.
    """
    if not isinstance(ids, Tensor):  # pyright: ignore[reportUnnecessaryIsInstance]  # user input
        raise TypeError(f"{model}: {name} must be a torch.Tensor of token ids [b, s], "
                        f"got {type(ids).__qualname__}")
    if ids.dim() != 2:
        raise ValueError(f"{model}: {name} must be 2-D [batch, sequence], got shape "
                         f"{tuple(ids.shape)}; add a batch dimension with ids.unsqueeze(0)")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{model}: {name} must hold integer token ids (int64 or int32), "
                         f"got dtype {ids.dtype}")
    if ids.shape[1] < 1:
        raise ValueError(f"{model}: {name} of shape {tuple(ids.shape)} has no tokens")
    if ids.device.type == "cpu" and ids.numel() > 0:
        low, high = (int(v) for v in torch.aminmax(ids))
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{model}: {name} must lie in [0, vocab_size={vocab_size}), got "
                             f"values from {low} to {high}; check the tokenizer against the "
                             "model's vocab_size")


@torch.no_grad()
def reinitialize_parameters(model: nn.Module, std: float,
                            num_layers_of: Callable[[str], int]) -> None:
    """Every parameter of `model` from scratch, after each submodule's own `reset_parameters`.

    Biases 0; other 1-D weights (norm scales) 1 (0 for zero-centered norms); weights of the linears writing into the
    residual stream normal(0, std / sqrt(2 * L)) with `L = num_layers_of(parameter name)` (the
    depth of the stack holding it); every other weight normal(0, std).
    """
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if module is not model and callable(reset):
            reset()
    for name, param in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if leaf == "bias":
            param.zero_()
        elif param.dim() == 1:
            # A zero-centered norm (`layernorm_zero_centered_gamma`) scales by 1 + weight.
            owner_module: object = model.get_submodule(owner)
            centered = getattr(owner_module, "zero_centered_gamma", False) is True
            param.fill_(0.0 if centered else 1.0)
        elif owner.rpartition(".")[2] in RESIDUAL_OUTPUT_LINEARS:
            param.normal_(0.0, std / math.sqrt(2.0 * num_layers_of(name)))
        else:
            param.normal_(0.0, std)


def output_layer(config: TransformerConfig, vocab_size: int, *, init_method: InitMethod,
                 pg: ProcessGroups, parallel_output: bool, tied: bool) -> ColumnParallelLinear:
    """The language-model head: hidden -> vocabulary, split over the tensor-parallel ranks by
    vocabulary; no bias; `tied` allocates no weight (the embedding's is passed at each call)."""
    return ColumnParallelLinear(
        config.hidden_size, vocab_size, config=config, init_method=init_method, bias=False,
        gather_output=not parallel_output, skip_bias_add=False, tp_group=pg.tp,
        skip_weight_param_allocation=tied)
