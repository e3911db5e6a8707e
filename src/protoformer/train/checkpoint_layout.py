"""Where each rank's tensors sit in the single-process model's tensors, for `torch.distributed.checkpoint`.

A sharded (DCP) checkpoint stores every parameter and optimizer state as the *global* tensor
of the single-process model: each rank writes its pieces at their offsets in it, and DCP
re-slices them for whatever layout loads the checkpoint (another tensor-parallel size, another
number of FSDP ranks, one process). This module says, for one rank, which rows (or columns)
of its local tensor go where:

- tensor parallelism (ours: plain per-rank tensors) splits a parameter along its
  `ParallelMetadata.partition_dim`: rank r holds the r-th chunk; replicated parameters are
  the whole tensor on every rank (DCP keeps one copy);
- the gated `linear_fc1` holds this rank's gate rows then its up rows, which are two
  separate row ranges of the single-process `[gate; up]` weight;
- a fused `linear_qkv` (and cross-attention's `linear_kv`) with fewer key/value groups than
  ranks holds this rank's query heads and a copy of its group's key/value heads (the layout
  `protoformer.transformer.attention` documents): the query rows and the key/value rows go
  to two places in their group's block; the copies on the other ranks of the group are
  identical writes of the same piece;
- FSDP2 (`fully_shard`) then shards each tensor-parallel slice along dim 0 over the
  data-parallel ranks (`torch.chunk` sizes); its rows intersect the ranges above;
- expert parallelism (Megatron-Core's convention): expert-parallel rank `r` of `ep` holds the
  contiguous block of experts `r * E_local ... (r + 1) * E_local - 1`. A grouped experts'
  tensor `[E_local, ...]` (`ParallelMetadata.expert_parallel`) is rows `r * E_local ...` of
  the single-process `[E, ...]` tensor; one MLP per expert (`SequentialMLP`'s
  `local_experts.{i}`) is the single-process `local_experts.{r * E_local + i}`
  (`expert_global_name`). The expert-data-parallel replicas write identical pieces.

`GlobalPieces` carries a rank's pieces through DCP's planners (`PiecesSavePlanner`,
`PiecesLoadPlanner`), which write them as chunks of the global tensor and read the global
tensor's chunks back into them in place.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.tensor import DTensor, Shard

from protoformer.config import TransformerConfig
from protoformer.parallel.parameters import ParallelMetadata

__all__ = ["GlobalPieces", "PiecesLoadPlanner", "PiecesSavePlanner", "Segment",
           "expert_global_name", "global_value", "owner_config", "tensor_parallel_segments"]

_LOCAL_EXPERT = re.compile(r"(^|\.)local_experts\.(\d+)\.")


@dataclass(frozen=True)
class Segment:
    """`length` slices along `dim` of a rank's tensor-parallel tensor, from `local_start`,
    that sit at `global_start` along `dim` in the single-process tensor."""

    dim: int
    local_start: int
    global_start: int
    length: int


def owner_config(model: nn.Module, name: str) -> TransformerConfig | None:
    """The config of the module that owns the module holding parameter `name`, if any."""
    path = name.rsplit(".", 2)[0]  # the owner of e.g. "...self_attention" in "...linear_qkv.weight"
    try:
        owner = model.get_submodule(path)
    except AttributeError:
        return None
    config = getattr(owner, "config", None)
    return config if isinstance(config, TransformerConfig) else None


def tensor_parallel_segments(name: str, local_shape: torch.Size, record: ParallelMetadata,
                             config: TransformerConfig | None, tp_rank: int, tp_size: int,
                             ) -> tuple[torch.Size, list[Segment]]:
    """The single-process shape of tensor `name` and where this rank's slice (`local_shape`)
    of it goes (the segments cover the local tensor along their dim, in order)."""
    dim = record.partition_dim
    if dim is None or tp_size == 1 or len(local_shape) == 0:
        return local_shape, [Segment(0, 0, 0, local_shape[0] if local_shape else 1)]
    rows = local_shape[dim]
    full = list(local_shape)
    leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
    if dim == 0 and config is not None and leaf == "linear_fc1" and config.gated_linear_unit:
        half = rows // 2  # this rank's gate rows, then its up rows
        full[0] = rows * tp_size
        return torch.Size(full), [Segment(0, 0, tp_rank * half, half),
                                  Segment(0, half, full[0] // 2 + tp_rank * half, half)]
    if dim == 0 and config is not None and leaf in ("linear_qkv", "linear_kv") \
            and config.query_groups < tp_size:
        groups, hn = config.query_groups, config.head_dim
        replicas = tp_size // groups
        group = tp_rank // replicas
        query_rows = config.num_attention_heads // tp_size * hn if leaf == "linear_qkv" else 0
        block = replicas * query_rows + 2 * hn  # one group: its query heads, then k and v
        full[0] = groups * block
        segments = [Segment(0, 0, group * block + tp_rank % replicas * query_rows, query_rows)]
        segments.append(Segment(0, query_rows, group * block + replicas * query_rows, 2 * hn))
        return torch.Size(full), [s for s in segments if s.length > 0]
    full[dim] = rows * tp_size
    return torch.Size(full), [Segment(dim, 0, tp_rank * rows, rows)]


class GlobalPieces:
    """A rank's pieces of one global tensor: (offsets in the global tensor, local view).

    The views alias the rank's own tensors, so loading into them fills those in place."""

    def __init__(self, global_size: torch.Size, pieces: list[tuple[torch.Size, Tensor]]) -> None:
        self.global_size = global_size
        self.pieces = pieces

    def size(self) -> torch.Size:
        """The global tensor's shape (DCP's load plan compares it with the saved one)."""
        return self.global_size

    def __create_write_items__(self, fqn: str, obj: object) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, offsets), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(
                              chunk=ChunkStorageMetadata(offsets=offsets, sizes=piece.size()),
                              properties=TensorProperties.create_from_tensor(piece),
                              size=self.global_size))
                for offsets, piece in self.pieces]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=offsets, sizes=piece.size())
                for offsets, piece in self.pieces]

    def piece(self, offsets: torch.Size | None) -> Tensor:
        for start, piece in self.pieces:
            if offsets == start:
                return piece
        raise ValueError(f"no piece at offsets {offsets}")


def _planned(planner: DefaultSavePlanner | DefaultLoadPlanner) -> dict[str, object]:
    """The planner's flattened state dict (torch types its values with an unbound TypeVar)."""
    return cast("dict[str, object]", vars(planner)["state_dict"])


def _lookup(state_dict: Mapping[str, object], index: MetadataIndex) -> Tensor | None:
    value = state_dict.get(index.fqn)
    return value.piece(index.offset) if isinstance(value, GlobalPieces) else None


class PiecesSavePlanner(DefaultSavePlanner):
    """DCP's default save planner, plus `GlobalPieces` values (written as their chunks)."""

    def lookup_object(self, index: MetadataIndex) -> object:
        piece = _lookup(_planned(self), index)
        if piece is None:
            return super().lookup_object(index)
        # A view of a larger tensor would be serialised with all of its storage.
        whole = piece.is_contiguous() and piece.untyped_storage().nbytes() == \
            piece.numel() * piece.element_size()
        return piece.detach().cpu() if whole else piece.detach().cpu().clone()


def _stand_in(value: object, path: str, found: dict[str, GlobalPieces]) -> object:
    """A copy of the nested dicts with each `GlobalPieces` replaced by an empty tensor, and the
    pieces by their flattened key (DCP's "a.b.c")."""
    if isinstance(value, GlobalPieces):
        found[path] = value
        return torch.empty(0)
    if isinstance(value, dict):
        items = cast("dict[str, object]", value).items()
        return {key: _stand_in(entry, f"{path}.{key}" if path else key, found)
                for key, entry in items}
    return value


class PiecesLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, plus `GlobalPieces` values (read into their views)."""

    def set_up_planner(self, state_dict: dict[str, Any], metadata: Metadata | None = None,
                       is_coordinator: bool = False) -> None:
        # The default set-up initialises the values it knows (tensors) and drops the others.
        found: dict[str, GlobalPieces] = {}
        stand_in = cast("dict[str, Any]", _stand_in(state_dict, "", found))
        super().set_up_planner(stand_in, metadata, is_coordinator)  # pyright: ignore[reportUnknownMemberType]  # torch's STATE_DICT_TYPE holds an unbound TypeVar
        self.original_state_dict = state_dict
        _planned(self).update(found)

    def lookup_tensor(self, index: MetadataIndex) -> Tensor:
        piece = _lookup(_planned(self), index)
        return super().lookup_tensor(index) if piece is None else piece


def _fsdp_rows(value: Tensor) -> tuple[Tensor, torch.Size, int]:
    """(local tensor, this tensor-parallel rank's shape of it, first dim-0 row held here).

    FSDP2 keeps a parameter as a DTensor sharded along dim 0 over the data-parallel mesh in
    `torch.chunk` sizes (the last ranks may hold fewer rows, or none)."""
    if not isinstance(value, DTensor):
        return value, value.shape, 0
    mesh = value.device_mesh
    if mesh.ndim != 1 or tuple(value.placements) != (Shard(0),):
        raise ValueError(f"a DTensor placed {value.placements} on a {mesh.ndim}-D mesh; "
                         "sharded checkpoints map FSDP's dim-0 sharding only")
    local = value.to_local()
    rows = value.shape[0]
    chunk = math.ceil(rows / mesh.size())
    start = min(mesh.get_local_rank() * chunk, rows)
    if local.shape[0] != min(rows, start + chunk) - start:
        raise ValueError(f"FSDP shard of {local.shape[0]} rows, expected a torch.chunk share "
                         f"of {rows} rows from row {start}")
    return local, value.shape, start


def expert_global_name(model: nn.Module, name: str, ep_rank: int, *,
                       split_over: int = 1) -> str | None:
    """The single-process name of parameter `name` of one expert's own MLP
    (`...local_experts.{i}...`, i counted on this rank) under expert parallelism:
    `...local_experts.{ep_rank * E_local + i}...`; None for any other name. `model` is the
    rank's model; or the single-process one (holding every expert) with `split_over` the number
    of expert-parallel ranks the experts were split over."""
    found = _LOCAL_EXPERT.search(name)
    if found is None:
        return None
    experts = model.get_submodule(name[:found.start(2) - len("local_experts.")].rstrip("."))
    local = getattr(experts, "num_local_experts", None)
    if not isinstance(local, int):
        raise ValueError(f"{name}: the module holding local_experts has no num_local_experts; "
                         "cannot place its experts in a sharded checkpoint")
    index = ep_rank * (local // split_over) + int(found.group(2))
    return f"{name[:found.start(2)]}{index}{name[found.end(2):]}"


def global_value(name: str, value: Tensor, record: ParallelMetadata,
                 config: TransformerConfig | None, tp_rank: int, tp_size: int,
                 ep_rank: int = 0, ep_size: int = 1) -> Tensor | GlobalPieces:
    """`value` (a parameter of this rank, or an optimizer state shaped like it) as a piece of
    the single-process tensor: itself when it is the whole tensor, else its `GlobalPieces`.
    A grouped experts' tensor (`record.expert_parallel`, `[E_local, ...]`) under expert
    parallelism sits at rows `ep_rank * E_local` of the `[E, ...]` tensor (pass `ep_size=1`
    for one expert's own MLP, which `expert_global_name` places by name)."""
    placed = _global_value(name, value, record, config, tp_rank, tp_size)
    if not record.expert_parallel or ep_size == 1 or value.dim() == 0:
        return placed
    if isinstance(value, DTensor):
        raise ValueError(f"{name}: an FSDP-sharded routed expert; sharded checkpoints map "
                         "expert parallelism without FSDP only")
    experts = value.shape[0]  # [E_local, ...]: the experts are not tensor-parallel (ETP=1)
    if isinstance(placed, Tensor):
        placed = GlobalPieces(placed.shape, [(torch.Size([0] * placed.dim()), placed)])
    size = torch.Size([experts * ep_size, *placed.global_size[1:]])
    return GlobalPieces(size, [(torch.Size([ep_rank * experts + offsets[0], *offsets[1:]]), piece)
                               for offsets, piece in placed.pieces])


def _global_value(name: str, value: Tensor, record: ParallelMetadata,
                  config: TransformerConfig | None, tp_rank: int, tp_size: int,
                  ) -> Tensor | GlobalPieces:
    local, tp_shape, first_row = _fsdp_rows(value)
    if local.dim() == 0:
        return local
    size, segments = tensor_parallel_segments(name, tp_shape, record, config, tp_rank, tp_size)
    if size == local.shape and first_row == 0:
        return local
    pieces: list[tuple[torch.Size, Tensor]] = []
    held = local.shape[0]
    for segment in segments:
        offsets = [0] * local.dim()
        if segment.dim == 0:
            start = max(segment.local_start, first_row)
            end = min(segment.local_start + segment.length, first_row + held)
            if end <= start:
                continue
            offsets[0] = segment.global_start + start - segment.local_start
            view = local.narrow(0, start - first_row, end - start)
        else:
            if held == 0:
                continue
            offsets[0] = first_row
            offsets[segment.dim] = segment.global_start
            view = local
        pieces.append((torch.Size(offsets), view))
    return GlobalPieces(size, pieces)
