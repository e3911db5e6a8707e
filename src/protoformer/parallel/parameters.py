"""Creating the parameters of tensor-parallel layers: this rank's slice, initialised and tagged.

Initialisation: every rank initialises the *full* weight with `init_method` and keeps its own
slice, so a model built after the same `torch.manual_seed` equals the single-process model
whatever the tensor-parallel size (the default RNG must be in the same state on every
tensor-parallel rank, as `protoformer.parallel.random.model_parallel_manual_seed` leaves it;
each rank briefly holds one full-size weight while it initialises). Parameters are created
on the default device (`torch.set_default_device` or a `with torch.device(...)` block; on the
`meta` device nothing is initialised).

Each parameter carries Megatron-Core's attributes (`tensor_model_parallel`, `partition_dim`,
`partition_stride`) telling checkpoint, conversion and gradient code how it is split.
"""

from __future__ import annotations

import torch
from torch import nn

from protoformer.config import TransformerConfig
from protoformer.parallel.groups import ProcessGroup, group_rank, group_size
from protoformer.parallel.protocols import InitMethod

__all__ = ["divide", "new_bias", "new_weight", "require_size", "set_parameter_attribute"]


def require_size(layer: str, name: str, value: object) -> int:
    """`value` if it is a positive int; otherwise a ValueError naming `layer` and `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{layer}: {name}={value!r} must be a positive int")
    return value


def divide(layer: str, name: str, value: int, tp_size: int) -> int:
    """`value / tp_size`, each rank's share; a ValueError when it does not split evenly."""
    if value % tp_size != 0:
        raise ValueError(
            f"{layer}: {name}={value} is not divisible by the tensor-parallel size {tp_size}; "
            f"each rank holds {name} / {tp_size}, so choose a multiple of {tp_size} (pad the "
            "vocabulary, or pick head and hidden sizes that split evenly)")
    return value // tp_size


def new_weight(full_shape: tuple[int, int], *, partition_dim: int | None,
               tp_group: ProcessGroup | None, config: TransformerConfig,
               init_method: InitMethod) -> nn.Parameter:
    """This rank's slice (along `partition_dim`; None = replicated) of a `full_shape` weight."""
    tp_size, tp_rank = group_size(tp_group), group_rank(tp_group)
    local_shape = list(full_shape)
    if partition_dim is not None:
        local_shape[partition_dim] //= tp_size
    weight = torch.empty(local_shape, dtype=config.params_dtype)  # on the default device
    if config.perform_initialization and not weight.is_meta:
        with torch.no_grad():
            if partition_dim is None or tp_size == 1:
                init_method(weight)
            else:
                # The same full weight on every rank (same RNG state), then this rank's slice:
                # equal to the single-process weight for the same seed.
                master = torch.empty(full_shape, dtype=weight.dtype, device=weight.device)
                init_method(master)
                weight.copy_(master.chunk(tp_size, dim=partition_dim)[tp_rank])
    parameter = nn.Parameter(weight)
    _mark_parameter(parameter, partition_dim=partition_dim)
    return parameter


def new_bias(size: int, *, partition_dim: int | None, config: TransformerConfig) -> nn.Parameter:
    """A zero bias of this rank's `size` (split along `partition_dim`; None = replicated)."""
    parameter = nn.Parameter(torch.zeros(size, dtype=config.params_dtype))
    _mark_parameter(parameter, partition_dim=partition_dim)
    return parameter


def _mark_parameter(parameter: nn.Parameter, *, partition_dim: int | None) -> None:
    """Megatron-Core's attributes telling checkpoint and conversion code how a parameter is split."""
    attributes: dict[str, object] = {
        "tensor_model_parallel": partition_dim is not None,
        "partition_dim": -1 if partition_dim is None else partition_dim,
        "partition_stride": 1,
    }
    for name, value in attributes.items():
        set_parameter_attribute(parameter, name, value)


def set_parameter_attribute(parameter: nn.Parameter, name: str, value: object) -> None:
    """Tag `parameter` with `name = value` (how it is split, or how its gradient is reduced)."""
    setattr(parameter, name, value)
