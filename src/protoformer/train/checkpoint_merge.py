"""Load the weights of a tensor-parallel checkpoint into one process (merging the shards).

A torchrun job with `--tp N` saves one weight file per tensor-parallel rank
(`protoformer.train.checkpoint_dist`). To generate from it, export it or inspect it on one
process, the shards are put back together, parameter by parameter, from the split each
parameter's `ParallelMetadata` (`partition_dim`) on the single-process
model:

- under expert parallelism (`--ep N`, one file per EP rank too) the routed experts'
  `[E_local, ...]` weights of the EP ranks are first concatenated along the expert
  dimension (EP rank order = expert order), one MLP per expert (`local_experts.{i}` of EP
  rank r) becomes expert `r * E_local + i`, everything else is EP rank 0's;
- replicated parameters (norms, MLA's down-projections): rank 0's copy;
- split parameters: the shards concatenated along `partition_dim` in rank order;
- the gated `linear_fc1`: each rank holds its gate rows then its up rows, so the gate parts
  and the up parts are concatenated separately;
- a fused `linear_qkv` (and cross-attention's `linear_kv`) with fewer key/value groups than
  ranks: each rank holds its query heads and a copy of its group's key/value heads, so the
  query heads are concatenated within each group and one copy of each key/value head is kept
  (the layout `protoformer.transformer.attention` documents).

Only the weights: resuming training with another tensor-parallel size (re-splitting the
optimizer state) is not supported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from protoformer.config import TransformerConfig
from protoformer.parallel.parameters import parallel_metadata
from protoformer.train.checkpoint_files import (
    CheckpointError,
    JSONValue,
    shard_file_names,
    verify_file,
)
from protoformer.train.checkpoint_layout import expert_global_name, owner_config
from protoformer.train.checkpoint_state import check_model_tensors, read_model_file

__all__ = ["load_merged_weights", "merge_shards"]


def _merge_grouped(shards: Sequence[Tensor], config: TransformerConfig, *, queries: bool) -> Tensor:
    """Fused rows with `num_query_groups < tp`: each rank = [its query heads | k | v of its group]."""
    tp, groups, hn = len(shards), config.query_groups, config.head_dim
    replicas = tp // groups
    heads_per_rank = config.num_attention_heads // tp if queries else 0
    rest = tuple(shards[0].shape[1:])
    parts: list[Tensor] = []
    for group in range(groups):
        ranks = range(group * replicas, (group + 1) * replicas)
        for rank in ranks if queries else ():
            parts.append(shards[rank][:heads_per_rank * hn])  # this rank's query heads
        first = shards[group * replicas]
        parts.append(first[heads_per_rank * hn:])  # one copy of the group's key and value heads
    return torch.cat(parts, dim=0).reshape(-1, *rest)


def merge_shards(name: str, shards: Sequence[Tensor], param: Tensor,
                 config: TransformerConfig | None) -> Tensor:
    """The single-process tensor `name` from its `len(shards)` tensor-parallel pieces.

    `param` is the single-process model's parameter (its split attributes say how to join);
    `config` the config of the layer owning it (needed for the fused attention layouts).
    """
    dim = parallel_metadata(param).partition_dim
    if dim is None or len(shards) == 1:
        return shards[0]
    leaf = name.rsplit(".", 2)[-2]  # the owning module's attribute name
    if leaf == "linear_fc1" and config is not None and config.gated_linear_unit:
        halves = [shard.chunk(2, dim=0) for shard in shards]
        return torch.cat([half[0] for half in halves] + [half[1] for half in halves], dim=0)
    if leaf in ("linear_qkv", "linear_kv") and config is not None \
            and config.query_groups < len(shards):
        return _merge_grouped(shards, config, queries=leaf == "linear_qkv")
    return torch.cat(tuple(shards), dim=dim)


def _read_tp_shard(directory: Path, records: Mapping[str, JSONValue], model: nn.Module,
                   tp_rank: int, tp_size: int, ep_size: int, *,
                   verify: bool = True) -> dict[str, Tensor]:
    """Tensor-parallel rank `tp_rank`'s tensors; under expert parallelism its `ep_size` files
    joined: routed experts (`expert_parallel` in the single-process model) concatenated along
    the expert dimension, everything else (equal on every EP rank) from EP rank 0."""
    parts: list[dict[str, Tensor]] = []
    for ep_rank in range(ep_size):
        model_file, _ = shard_file_names(tp_rank, tp_size, ep_rank, ep_size)
        verify_file(directory / model_file, records.get(model_file), verify=verify)
        parts.append(read_model_file(directory / model_file))
    if ep_size == 1:
        return parts[0]
    params = dict(model.named_parameters())
    joined = dict(parts[0])
    per_expert: set[str] = set()
    for ep_rank, part in enumerate(parts):  # one MLP per expert: rename to the global index
        for name, tensor in part.items():
            try:
                global_name = expert_global_name(model, name, ep_rank, split_over=ep_size)
            except (AttributeError, ValueError) as error:  # no such module in this model
                raise CheckpointError(f"{directory}: {name} of expert-parallel rank {ep_rank} "
                                      f"is not an expert of this model ({error})") from None
            if global_name is not None:
                per_expert.add(name)
                joined[global_name] = tensor
    for name in parts[0]:
        if name in per_expert:
            continue
        if name in params and parallel_metadata(params[name]).expert_parallel:
            try:
                joined[name] = torch.cat([part[name] for part in parts], dim=0)
            except (KeyError, RuntimeError) as error:
                raise CheckpointError(f"{directory}: cannot join the {ep_size} expert-parallel "
                                      f"files of {name} ({error!r})") from error
    return joined


def load_merged_weights(directory: Path, document: Mapping[str, JSONValue], model: nn.Module,
                        tp_size: int, ep_size: int = 1, *, verify: bool = True) -> None:
    """Load the `tp_size` (x `ep_size`) weight shards in `directory` into the single-process
    `model`.

    Every shard file is checked against state.json and the merged tensors against the model
    (names and shapes) before the model is touched.
    """
    files = document.get("files")
    records: dict[str, JSONValue] = files if isinstance(files, dict) else {}
    shards = [_read_tp_shard(directory, records, model, rank, tp_size, ep_size,
                             verify=verify)
              for rank in range(tp_size)]
    names = set(shards[0])
    for rank, tensors in enumerate(shards[1:], start=1):
        if set(tensors) != names:
            raise CheckpointError(f"{directory}: the shards of ranks 0 and {rank} hold different "
                                  f"tensors ({sorted(set(tensors) ^ names)[:5]}); the checkpoint "
                                  "is inconsistent")
    params = dict(model.named_parameters())
    merged: dict[str, Tensor] = {}
    expected = model.state_dict()
    for name in sorted(names & set(expected)):
        pieces = [tensors[name] for tensors in shards]
        param: Tensor = params[name] if name in params else expected[name]  # buffers: replicated
        try:
            merged[name] = merge_shards(name, pieces, param, owner_config(model, name))
        except RuntimeError as error:
            raise CheckpointError(f"{directory}: cannot merge the {tp_size} shards of {name} "
                                  f"({error}); was it saved from a different model?") from error
    merged.update({name: shards[0][name] for name in names - set(expected)})  # reported below
    check_model_tensors(directory, merged, model)
    model.load_state_dict(merged, strict=True)
