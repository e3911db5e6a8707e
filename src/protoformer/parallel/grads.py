"""Gradient bookkeeping after backward: sums over tensor-parallel ranks, DP averaging, clipping.

Under tensor parallelism most gradients are complete after backward: a split parameter's
gradient is its slice of the single-process gradient, and a replicated parameter used on
replicated activations gets the full gradient on every rank. Two kinds of replicated
parameters are the exception; each rank holds only a *partial* gradient that must be summed
over the tensor-parallel group (`finalize_model_grads` does it, in one coalesced all-reduce):

- parameters whose `ParallelMetadata` says `sequence_parallel` (norms, replicated `Linear`s
  and learned position embeddings under `config.sequence_parallel`: each rank sees only its
  slice of the sequence), and
- parameters whose metadata says `partial_grad` (`mark_partial_grad_over_tp`): per-head q/k
  norms, applied on each rank to that rank's heads only.

Gradient clipping needs the norm of the *whole* model's gradient: `clip_grad_norm_` sums the
squares of split parameters over the tensor-parallel group, counts replicated ones once, and
skips rows that a rank holds only as a copy of another rank's (replicated key/value heads when
`num_query_groups < tp`, metadata `duplicate_rows_from`). The metadata is the one record of
`protoformer.parallel.parameters.parallel_metadata`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from protoformer.parallel.groups import ProcessGroup, ProcessGroups, group_size
from protoformer.parallel.mappings import all_reduce_in_place
from protoformer.parallel.parameters import parallel_metadata, set_parallel_metadata

__all__ = [
    "all_reduce_data_parallel_grads",
    "clip_grad_norm_",
    "compute_deferred_weight_grads",
    "finalize_model_grads",
    "grad_norm",
    "is_expert_parallel",
    "mark_duplicate_rows",
    "mark_expert_parallel",
    "mark_partial_grad_over_tp",
    "needs_tensor_parallel_grad_sum",
    "reduce_expert_grads",
]

def mark_partial_grad_over_tp(module: nn.Module) -> None:
    """Tag every parameter of `module`: its gradient is summed over the tensor-parallel group.

    For replicated layers each rank applies to different data (its own heads, say), so that
    the rank's gradient is a partial sum. `finalize_model_grads` completes it.
    """
    for param in module.parameters():
        set_parallel_metadata(param, dataclasses.replace(parallel_metadata(param),
                                                         partial_grad=True))


def mark_duplicate_rows(param: nn.Parameter, first_row: int) -> None:
    """Tag rows `first_row:` of `param` as a copy of rows another tensor-parallel rank holds.

    Their gradients stay equal to the original's (the layer sums them), so a global gradient
    norm must count them once: `clip_grad_norm_` skips them on this rank.
    """
    if first_row < 0 or first_row > param.shape[0]:
        raise ValueError(f"mark_duplicate_rows: first_row={first_row} outside the parameter's "
                         f"{param.shape[0]} rows")
    set_parallel_metadata(param, dataclasses.replace(parallel_metadata(param),
                                                     duplicate_rows_from=first_row))


def mark_expert_parallel(module: nn.Module) -> None:
    """Tag every parameter of `module` as a routed expert's, split over the expert-parallel
    group: under expert parallelism its gradient is averaged over `pg.expt_dp` (the ranks
    holding the same experts), not the whole data-parallel group, and `grad_norm` sums its
    squares over `pg.ep`."""
    for param in module.parameters():
        set_parallel_metadata(param, dataclasses.replace(parallel_metadata(param),
                                                         expert_parallel=True))


def is_expert_parallel(param: Tensor) -> bool:
    """Whether `param` belongs to routed experts (`mark_expert_parallel`)."""
    return parallel_metadata(param).expert_parallel


def needs_tensor_parallel_grad_sum(param: Tensor) -> bool:
    """Whether `param`'s gradient must be summed over the tensor-parallel group after backward."""
    return parallel_metadata(param).needs_tensor_parallel_grad_sum


def compute_deferred_weight_grads(model: nn.Module) -> int:
    """Call `backward_dw()` on the outermost submodules of `model` that have one.

    With `config.delay_wgrad_compute` backward leaves the weight gradients of the linear
    layers queued; this computes them (an attention layer's `backward_dw` also keeps its
    replicated key/value gradients summed, so it is called instead of its linears'). Returns
    how many modules were called; a no-op (cheap) when nothing is queued.
    """
    called = 0
    pending: list[nn.Module] = [model]
    while pending:
        module = pending.pop()
        backward_dw: object = getattr(module, "backward_dw", None)
        if callable(backward_dw):
            backward_dw()
            called += 1
            continue
        pending.extend(reversed(list(module.children())))
    return called


def _all_reduce_coalesced(tensors: list[Tensor], group: ProcessGroup, *,
                          scale: float | None = None) -> None:
    """Sum `tensors` over `group` in place, one all-reduce per (dtype, device); then `*= scale`."""
    buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for tensor in tensors:
        buckets.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for bucket in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in bucket])  # [sum of numels]
        all_reduce_in_place(flat, group)
        if scale is not None:
            flat.mul_(scale)
        offset = 0
        for tensor in bucket:
            count = tensor.numel()
            tensor.copy_(flat[offset:offset + count].view_as(tensor))
            offset += count


def _local(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2's sharded gradients), else the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _grads(parameters: Iterable[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """(parameter, gradient) pairs, each tied parameter once; FSDP2's sharded gradients as
    their local shards (updated in place through them)."""
    pairs: list[tuple[Tensor, Tensor]] = []
    seen: set[int] = set()
    for param in parameters:
        if id(param) in seen:  # a tied parameter listed twice
            continue
        seen.add(id(param))
        if param.grad is not None:
            pairs.append((param, _local(param.grad)))
    return pairs


def _sharded_over_data_parallel(pairs: list[tuple[Tensor, Tensor]]) -> bool:
    """Whether the gradients are FSDP2 shards (each data-parallel rank holds a part)."""
    return any(isinstance(param, DTensor) for param, _ in pairs)


@torch.no_grad()
def finalize_model_grads(model: nn.Module, pg: ProcessGroups | None = None, *,
                         reduce_data_parallel: bool = False) -> None:
    """Complete the gradients after backward (and after any `backward_dw()`), before clipping.

    Sums over `pg.tp` the gradients of parameters that `needs_tensor_parallel_grad_sum`
    selects (sequence-parallel norms and the like). With `reduce_data_parallel=True` it also
    averages every gradient over `pg.dp`: for a model *not* wrapped in
    `DistributedDataParallel` (which averages during backward itself). A no-op with one rank.
    """
    pg = pg if pg is not None else ProcessGroups()
    pairs = _grads(model.parameters())
    if pg.tp_size > 1:
        partial = [grad for param, grad in pairs if needs_tensor_parallel_grad_sum(param)]
        if partial:
            _all_reduce_coalesced(partial, _require(pg.tp))
    if reduce_data_parallel and pg.dp_size > 1:
        all_reduce_data_parallel_grads(model, pg)


@torch.no_grad()
def all_reduce_data_parallel_grads(model: nn.Module, pg: ProcessGroups) -> None:
    """Average every gradient of `model` over the data-parallel group `pg.dp` (coalesced).

    Under expert parallelism (`pg.ep_size > 1`) the routed experts' gradients
    (`is_expert_parallel`) already hold the contributions of every token of their EP group
    (the all-to-all's backward brings them), so they are summed over `pg.expt_dp` only and
    divided by the data-parallel size: the average over all data-parallel ranks' losses.
    """
    if pg.dp_size == 1:
        return
    pairs = _grads(model.parameters())
    split_experts = pg.ep_size > 1
    grads = [grad for param, grad in pairs if not (split_experts and is_expert_parallel(param))]
    if grads:
        _all_reduce_coalesced(grads, _require(pg.dp), scale=1.0 / pg.dp_size)
    if split_experts:
        reduce_expert_grads([grad for param, grad in pairs if is_expert_parallel(param)], pg)


def reduce_expert_grads(grads: list[Tensor], pg: ProcessGroups) -> None:
    """Routed experts' gradients under expert parallelism: summed over `pg.expt_dp`, divided
    by the data-parallel size (see `all_reduce_data_parallel_grads`)."""
    if grads and pg.expt_dp_size > 1:
        _all_reduce_coalesced(grads, _require(pg.expt_dp), scale=1.0 / pg.dp_size)
    else:
        for grad in grads:
            grad.mul_(1.0 / pg.dp_size)


def _require(group: ProcessGroup | None) -> ProcessGroup:
    assert group is not None and group_size(group) > 1  # callers check the size first
    return group


@torch.no_grad()
def grad_norm(parameters: Iterable[Tensor], pg: ProcessGroups | None = None) -> Tensor:
    """The 2-norm of the whole model's gradient (float32 scalar), as one process would compute it.

    Split parameters (metadata `tensor_model_parallel`) contribute their squares summed over `pg.tp`;
    replicated ones count once (their gradients must be complete: call
    `finalize_model_grads` first); rows tagged as duplicates of another rank's are skipped;
    routed experts under expert parallelism contribute their squares summed over `pg.ep`.
    Gradients are assumed equal across `pg.dp` (already averaged), or, sharded by FSDP2
    (DTensor parameters), each data-parallel rank's squares are summed over `pg.dp`. Under
    pipeline parallelism each stage's squares are summed over `pg.pp` (the last stage's copy
    of a tied embedding is skipped: the first stage counts it).
    """
    pg = pg if pg is not None else ProcessGroups()
    pairs = _grads(parameters)
    device = pairs[0][1].device if pairs else torch.device("cpu")
    split_sq = torch.zeros((), dtype=torch.float32, device=device)
    replicated_sq = torch.zeros((), dtype=torch.float32, device=device)
    expert_sq = torch.zeros((), dtype=torch.float32, device=device)
    for param, grad in pairs:
        record = parallel_metadata(param)
        if record.shared_embedding_copy:  # counted once, on the first pipeline stage
            continue
        if pg.ep_size > 1 and record.expert_parallel:  # each EP rank holds other experts
            expert_sq += grad.float().pow(2).sum().to(device)
        elif record.tensor_model_parallel:
            first_duplicate = record.duplicate_rows_from
            if first_duplicate is not None:
                grad = grad[:first_duplicate]
            split_sq += grad.float().pow(2).sum().to(device)
        else:
            replicated_sq += grad.float().pow(2).sum().to(device)
    if pg.tp_size > 1:
        all_reduce_in_place(split_sq, pg.tp)
    if pg.ep_size > 1:
        all_reduce_in_place(expert_sq, pg.ep)
    if pg.dp_size > 1 and _sharded_over_data_parallel(pairs):  # FSDP2 (refused with EP)
        both = torch.stack([split_sq, replicated_sq])  # [2]
        all_reduce_in_place(both, pg.dp)
        split_sq, replicated_sq = both[0], both[1]
    total = split_sq + replicated_sq + expert_sq
    if pg.pp_size > 1:  # each parameter lives on one pipeline stage
        total = all_reduce_in_place(total.clone(), pg.pp)
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float,
                    pg: ProcessGroups | None = None) -> Tensor:
    """Scale the gradients so that their global norm (`grad_norm`) is at most `max_norm`.

    Returns the norm before clipping. Every tensor-parallel rank computes the same norm, so
    every rank scales by the same factor (as `torch.nn.utils.clip_grad_norm_` would on one
    process). A non-finite norm leaves the gradients non-finite, as torch does.
    """
    if not max_norm > 0.0:
        raise ValueError(f"clip_grad_norm_: max_norm={max_norm} must be > 0")
    params = list(parameters)
    total = grad_norm(params, pg)
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for _, grad in _grads(params):
        grad.mul_(coefficient.to(grad.device, grad.dtype))
    return total
