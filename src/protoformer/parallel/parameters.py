"""Creating the parameters of tensor-parallel layers: this rank's slice, initialised and tagged.

Initialisation: every rank initialises the *full* weight with `init_method` and keeps its own
slice, so a model built after the same `torch.manual_seed` equals the single-process model
whatever the tensor-parallel size (the default RNG must be in the same state on every
tensor-parallel rank, as `protoformer.parallel.random.model_parallel_manual_seed` leaves it;
each rank briefly holds one full-size weight while it initialises). Parameters are created
on the default device (`torch.set_default_device` or a `with torch.device(...)` block; on the
`meta` device nothing is initialised).

Each parameter carries one frozen `ParallelMetadata` record (Megatron-Core's
`tensor_model_parallel`, `partition_dim`, `partition_stride`, plus how its gradient is reduced)
telling checkpoint, conversion and gradient code how it is split; read it with
`parallel_metadata(param)`, change it with `set_parallel_metadata`. FSDP2 (`fully_shard`)
replaces parameters with DTensors: `named_parallel_metadata` keeps the records by parameter
name before, `restore_parallel_metadata` puts them on the new parameters after.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from protoformer.config import TransformerConfig
from protoformer.parallel.groups import ProcessGroup, group_rank, group_size
from protoformer.parallel.protocols import InitMethod

__all__ = [
    "ParallelMetadata",
    "divide",
    "mark_sequence_parallel",
    "named_parallel_metadata",
    "new_bias",
    "new_weight",
    "parallel_metadata",
    "require_size",
    "restore_parallel_metadata",
    "set_parallel_metadata",
]

_ATTRIBUTE = "_protoformer_parallel"  # the one attribute a parameter carries


@dataclass(frozen=True)
class ParallelMetadata:
    """How a parameter is split over the tensor-parallel group and how its gradient is reduced."""

    partition_dim: int | None = None
    """The dimension split over the tensor-parallel ranks; None: every rank holds all of it."""
    partition_stride: int = 1
    """Megatron-Core's stride of the split (1: contiguous chunks)."""
    sequence_parallel: bool = False
    """A replicated parameter applied to a slice of the sequence on each rank: its gradient is
    summed over the tensor-parallel group."""
    partial_grad: bool = False
    """A replicated parameter applied to this rank's heads only: its gradient is summed over the
    tensor-parallel group."""
    duplicate_rows_from: int | None = None
    """On a split parameter, the first row this rank holds only as a copy of another rank's
    (replicated key/value heads): a global gradient norm skips them here."""
    expert_parallel: bool = False
    """A routed expert's parameter, split over the expert-parallel group by expert (dim 0):
    its gradient is averaged over the expert-data-parallel group only (Megatron-Core tags
    such parameters `allreduce = False`)."""
    shared_embedding_copy: bool = False
    """The last pipeline stage's copy of a tied token embedding (the output layer's weight):
    its gradient is summed with the first stage's over the embedding group, and the global
    gradient norm counts it on the first stage only (Megatron-Core's `shared` parameters)."""

    @property
    def tensor_model_parallel(self) -> bool:
        """Whether the parameter is split over the tensor-parallel group (Megatron's name)."""
        return self.partition_dim is not None

    @property
    def needs_tensor_parallel_grad_sum(self) -> bool:
        """Whether its gradient must be summed over the tensor-parallel group after backward."""
        return self.sequence_parallel or self.partial_grad


_REPLICATED = ParallelMetadata()


def parallel_metadata(param: Tensor) -> ParallelMetadata:
    """`param`'s record; a replicated one for a parameter no layer tagged."""
    record: object = getattr(param, _ATTRIBUTE, None)
    return record if isinstance(record, ParallelMetadata) else _REPLICATED


def set_parallel_metadata(param: Tensor, record: ParallelMetadata) -> None:
    """Give `param` its record (replacing the one it had)."""
    setattr(param, _ATTRIBUTE, record)


def mark_sequence_parallel(params: Iterable[Tensor], enabled: bool) -> None:
    """Record on replicated `params` whether each rank applies them to its slice of the sequence
    (their gradients are then summed over the tensor-parallel group)."""
    for param in params:
        set_parallel_metadata(param, dataclasses.replace(parallel_metadata(param),
                                                         sequence_parallel=enabled))


def named_parallel_metadata(model: nn.Module) -> dict[str, ParallelMetadata]:
    """Every parameter's record by its qualified name (`decoder.layers.0.mlp.linear_fc1.weight`)."""
    return {name: parallel_metadata(param) for name, param in model.named_parameters()}


def restore_parallel_metadata(model: nn.Module, records: Mapping[str, ParallelMetadata]) -> None:
    """Put `records` (from `named_parallel_metadata`) back on the parameters of the same names,
    after a wrapper such as `fully_shard` replaced the parameter objects."""
    for name, param in model.named_parameters():
        record = records.get(name)
        if record is not None:
            set_parallel_metadata(param, record)


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
    """The record of a new parameter: split along `partition_dim`, or replicated (None)."""
    set_parallel_metadata(parameter, dataclasses.replace(parallel_metadata(parameter),
                                                         partition_dim=partition_dim))
