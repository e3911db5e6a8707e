"""Routed experts: `GroupedLinear`, `GroupedMLP` (all experts' weights in one tensor, one
grouped GEMM per linear) and `SequentialMLP` (one `MLP` per expert from the linear builders).

Weight layout of `GroupedMLP`: `linear_fc1.weight [E, 2f, h]` (each expert's gate rows then
up rows when gated) and `linear_fc2.weight [E, h, f]`, i.e. one nn.Linear weight per expert
stacked, the layout of transformers' `gate_up_proj` / `down_proj` expert tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from protoformer.config import TransformerConfig
from protoformer.initialization import init_method_normal, scaled_init_method_normal
from protoformer.parallel.groups import ProcessGroups
from protoformer.parallel.protocols import InitMethod
from protoformer.spec import Submodules, apply_module
from protoformer.transformer.mlp import MLP, Activation, MLPSubmodules
from protoformer.transformer.moe.protocols import (
    ExpertActivationBuilder,
    GroupedLinearFc1Builder,
    GroupedLinearFc2Builder,
)

__all__ = ["ExpertActivation", "GroupedLinear", "GroupedMLP", "GroupedMLPSubmodules", "SequentialMLP", "grouped_mm_available"]


# torch's grouped GEMM (CUDA, Hopper+; private in the torch releases we support).
_GROUPED_MM: Callable[..., Tensor] | None = getattr(torch, "_grouped_mm", None)


def _host_counts(tokens_per_expert: Tensor) -> list[int]:
    """The per-expert row counts as Python ints (a host sync on GPU)."""
    return [int(count) for count in tokens_per_expert.cpu()]


def grouped_mm_available(input: Tensor, weight: Tensor) -> bool:
    """Can `torch._grouped_mm` run this bf16 product on this device (Hopper or newer)?"""
    return (input.is_cuda and input.dtype == torch.bfloat16 == weight.dtype
            and _GROUPED_MM is not None
            and torch.cuda.get_device_capability(input.device) >= (9, 0)
            and input.shape[-1] % 8 == 0 and weight.shape[-2] % 8 == 0)


def grouped_matmul(input: Tensor, weight: Tensor, tokens_per_expert: Tensor) -> Tensor:
    """Rows of expert e times `weight[e].T`: `[N, in]`, `[E, out, in]`, `[E]` -> `[N, out]`.

    One `torch._grouped_mm` (with its own backward) where available; elsewhere a loop over
    experts, which reads the counts on the host."""
    if _GROUPED_MM is not None and grouped_mm_available(input, weight):
        offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)  # [E] row ends
        return _GROUPED_MM(input, weight.transpose(-2, -1), offs=offsets)
    counts = _host_counts(tokens_per_expert)
    chunks = torch.split(input, counts)
    outputs = [chunk @ weight[expert].t() for expert, chunk in enumerate(chunks)]
    if not outputs:
        return input.new_zeros(0, weight.shape[1])
    return torch.cat(outputs)  # [N, out]


class GroupedLinear(nn.Module):
    """`num_local_experts` linears in one weight `[E, output_size, input_size]` (+ bias `[E, out]`)."""

    def __init__(self, num_local_experts: int, input_size: int, output_size: int, /, *,
                 config: TransformerConfig, init_method: InitMethod, bias: bool,
                 skip_bias_add: bool, is_expert: bool = True,
                 tp_comm_buffer_name: str | None = None) -> None:
        super().__init__()
        del is_expert, tp_comm_buffer_name  # always an expert; no tensor-parallel communication
        self.num_local_experts = num_local_experts
        self.input_size, self.output_size = input_size, output_size
        self.skip_bias_add = skip_bias_add
        self.weight = nn.Parameter(torch.empty(num_local_experts, output_size, input_size,
                                               dtype=config.params_dtype))
        self.bias = nn.Parameter(torch.zeros(num_local_experts, output_size, dtype=config.params_dtype)) \
            if bias else None
        if config.perform_initialization and not self.weight.is_meta:  # meta: shapes only
            init_method(self.weight)

    def forward(self, input: Tensor, tokens_per_expert: Tensor, /) -> tuple[Tensor, Tensor | None]:
        """`[N, in]`, `[E]` -> (`[N, out]`, per-row bias `[N, out]` when `skip_bias_add`)."""
        if input.shape[-1] != self.input_size:
            raise ValueError(f"GroupedLinear expects input [..., {self.input_size}], got "
                             f"{tuple(input.shape)}")
        output = grouped_matmul(input, self.weight, tokens_per_expert)
        if self.bias is None:
            return output, None
        row_bias = self.bias.repeat_interleave(tokens_per_expert, dim=0,
                                               output_size=input.shape[0])  # [N, out]
        if self.skip_bias_add:
            return output, row_bias
        return output + row_bias, None

    def extra_repr(self) -> str:
        return (f"experts={self.num_local_experts}, in={self.input_size}, out={self.output_size}, "
                f"bias={self.bias is not None}")


class ExpertActivation(nn.Module):
    """`config.activation_func` (gated or plain) times each row's routing weight, in plain
    PyTorch: `[N, 2f]` or `[N, f]`, `[N]` -> `[N, f]`."""

    def __init__(self, config: TransformerConfig, /, *, gated: bool) -> None:
        super().__init__()
        self.activation = Activation(config, gated=gated)

    def forward(self, x: Tensor, probs: Tensor, /) -> Tensor:
        return apply_module(self.activation)(x) * probs.unsqueeze(-1).to(x.dtype)  # [N, f]


@dataclass
class GroupedMLPSubmodules(Submodules):
    """The slots of `GroupedMLP`: the grouped linears and the prob-weighted activation."""

    linear_fc1: GroupedLinearFc1Builder
    linear_fc2: GroupedLinearFc2Builder
    activation: ExpertActivationBuilder


class GroupedMLP(nn.Module):
    """All local experts as two grouped linears: `fc2(act(fc1(x)) * prob)` (+ `prob * b2`).

    The routing weight multiplies the activation (`f` wide, cheaper than the `h`-wide output),
    which equals scaling each expert's output since `fc2` is linear.
    """

    def __init__(self, num_local_experts: int, config: TransformerConfig, /, *,
                 pg: ProcessGroups | None = None, submodules: GroupedMLPSubmodules) -> None:
        super().__init__()
        del pg  # experts are not split over tensor-parallel ranks
        if not isinstance(submodules, GroupedMLPSubmodules):  # pyright: ignore[reportUnnecessaryIsInstance]  # user input
            raise TypeError(f"GroupedMLP expects submodules=GroupedMLPSubmodules(...), got "
                            f"{type(submodules).__qualname__}")
        ffn = config.moe_ffn_size
        gated = config.gated_linear_unit
        self.num_local_experts = num_local_experts
        self.linear_fc1 = submodules.linear_fc1(
            num_local_experts, config.hidden_size, 2 * ffn if gated else ffn, config=config,
            init_method=init_method_normal(config.init_method_std), bias=config.add_bias_linear,
            skip_bias_add=False, is_expert=True, tp_comm_buffer_name="fc1")
        self.activation_func = submodules.activation(config, gated=gated)
        self.linear_fc2 = submodules.linear_fc2(
            num_local_experts, ffn, config.hidden_size, config=config,
            init_method=scaled_init_method_normal(config.init_method_std, config.num_layers),
            bias=config.add_bias_linear, skip_bias_add=True, is_expert=True,
            tp_comm_buffer_name="fc2")

    def forward(self, dispatched_input: Tensor, tokens_per_expert: Tensor,
                permuted_probs: Tensor, /) -> tuple[Tensor, Tensor | None]:
        """`[N, h]`, `[E]`, `[N]` -> (`[N, h]` prob-weighted, None)."""
        intermediate, _ = apply_module(self.linear_fc1)(dispatched_input, tokens_per_expert)  # [N, 2f]
        weighted = apply_module(self.activation_func)(intermediate, permuted_probs)  # [N, f]
        output, bias = apply_module(self.linear_fc2)(weighted, tokens_per_expert)  # [N, h]
        if bias is not None:
            output = output + bias * permuted_probs.unsqueeze(-1).to(bias.dtype)
        return output, None


class SequentialMLP(nn.Module):
    """One `MLP` per local expert (`local_experts.{i}`), built from the dense MLP's slots with
    `moe_ffn_hidden_size`; runs them one after another. The reference for `GroupedMLP`, and
    the way to give experts any linear a backend has."""

    def __init__(self, num_local_experts: int, config: TransformerConfig, /, *,
                 pg: ProcessGroups | None = None, submodules: MLPSubmodules) -> None:
        super().__init__()
        del pg  # each expert is whole on this rank
        self.num_local_experts = num_local_experts
        self.local_experts = nn.ModuleList(
            MLP(config, submodules, ffn_hidden_size=config.moe_ffn_size, is_expert=True)
            for _ in range(num_local_experts))

    def forward(self, dispatched_input: Tensor, tokens_per_expert: Tensor,
                permuted_probs: Tensor, /) -> tuple[Tensor, Tensor | None]:
        """`[N, h]`, `[E]`, `[N]` -> (`[N, h]` prob-weighted, None)."""
        counts = _host_counts(tokens_per_expert)
        outputs: list[Tensor] = []
        for expert, rows, probs in zip(self.local_experts, torch.split(dispatched_input, counts),
                                       torch.split(permuted_probs, counts), strict=True):
            output, bias = apply_module(expert)(rows)  # [n_e, h]
            if bias is not None:
                output = output + bias
            outputs.append(output * probs.unsqueeze(-1).to(output.dtype))
        if not outputs:
            return dispatched_input.new_zeros(dispatched_input.shape), None
        return torch.cat(outputs), None
