"""Token dispatch across expert-parallel ranks with all-to-all (Megatron-Core's
`MoEAlltoAllTokenDispatcher`).

Each of the `ep` ranks of `pg.ep` holds `num_local_experts` consecutive experts (rank `r`
experts `r * E_local ...`). `dispatch`:

1. sorts this rank's routed (token, expert) pairs by global expert, which also groups them
   by destination rank, and gathers the rows (`permute_tokens`, as on one rank);
2. exchanges the per-expert counts (`all_to_all_single` of `[ep, E_local]`), then the rows and
   their probs (`all_to_all_single` with those split sizes; autograd sends the gradients back
   the same way);
3. reorders the received rows from (source rank, local expert) to (local expert, source rank),
   so each local expert's rows are contiguous for the grouped GEMM.

`combine` undoes 3, 2 and 1: the expert outputs go back to the ranks their tokens came from
and each token's rows are summed. Step 2 needs the counts on the host (the split sizes), one
device-to-host copy per layer, as in Megatron-Core.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor

from protoformer.config import TransformerConfig
from protoformer.parallel.groups import ProcessGroup, ProcessGroups
from protoformer.parallel.mappings import apply_autograd_function
from protoformer.transformer.moe.dispatcher import expert_counts, permute_tokens, unpermute_tokens

__all__ = ["MoEAlltoAllTokenDispatcher", "all_to_all"]

# torch leaves the collective's parameters unannotated; this is how it is called here.
_all_to_all_single = cast("Callable[..., object]", dist.all_to_all_single)  # pyright: ignore[reportUnknownMemberType]


def _host_rows(counts: Tensor) -> list[list[int]]:
    """A `[ep, E_local]` count tensor as nested ints (the device-to-host copy)."""
    return [[int(value) for value in row] for row in counts.cpu().unbind(0)]


class _AllToAll(torch.autograd.Function):
    """Rows `[n, ...]` split by `input_splits` go to the group's ranks; the result is the rows
    received, `output_splits` from each rank, in rank order. Backward sends gradients back."""

    @staticmethod
    def forward(ctx: Any, input: Tensor, output_splits: list[int], input_splits: list[int],
                group: ProcessGroup) -> Tensor:
        ctx.splits = (output_splits, input_splits)
        ctx.group = group
        output = input.new_empty((sum(output_splits), *input.shape[1:]))
        _all_to_all_single(output, input.contiguous(), output_splits, input_splits, group=group)
        return output

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor | None, ...]:
        output_splits, input_splits = ctx.splits
        grad = apply_autograd_function(_AllToAll, grad_outputs[0], input_splits, output_splits,
                                       ctx.group)
        return grad, None, None, None


def all_to_all(input: Tensor, output_splits: list[int], input_splits: list[int],
               group: ProcessGroup) -> Tensor:
    """Differentiable `torch.distributed.all_to_all_single` over `group` along dim 0."""
    return apply_autograd_function(_AllToAll, input, output_splits, input_splits, group)


def _chunk_order(counts: list[list[int]], device: torch.device) -> Tensor:
    """Row order that regroups rows laid out by (source, expert) chunks into (expert, source).

    `counts[src][e]` rows of source `src` for local expert `e`, stored source-major. Returns
    `index [M]` with `received[index]` expert-major.
    """
    num_sources, num_experts = len(counts), len(counts[0])
    starts: list[list[int]] = []
    offset = 0
    for src in range(num_sources):
        row: list[int] = []
        for e in range(num_experts):
            row.append(offset)
            offset += counts[src][e]
        starts.append(row)
    pieces = [torch.arange(starts[src][e], starts[src][e] + counts[src][e], device=device)
              for e in range(num_experts) for src in range(num_sources)]
    if not pieces:
        return torch.zeros(0, dtype=torch.int64, device=device)
    return torch.cat(pieces)


class MoEAlltoAllTokenDispatcher:
    """The expert-parallel dispatcher: tokens travel to their experts' ranks and back.

    Built by `MoELayer` when `pg.ep_size > 1` (or named in `MoESubmodules.token_dispatcher`)
    for `num_local_experts` experts starting at global index `local_expert_offset` (which must
    be `pg.ep_rank * num_local_experts`).
    """

    def __init__(self, num_local_experts: int, local_expert_offset: int, /, *,
                 config: TransformerConfig, pg: ProcessGroups | None = None) -> None:
        pg = pg if pg is not None else ProcessGroups()
        experts = config.num_moe_experts
        if experts is None or num_local_experts * pg.ep_size != experts \
                or local_expert_offset != pg.ep_rank * num_local_experts:
            raise ValueError(
                f"MoEAlltoAllTokenDispatcher: {num_local_experts} local expert(s) from "
                f"{local_expert_offset} on expert-parallel rank {pg.ep_rank} of {pg.ep_size} do "
                f"not split num_moe_experts={experts} evenly in rank order")
        self.group = pg.ep
        self.ep_size = pg.ep_size
        self.num_experts = experts
        self.num_local_experts = num_local_experts
        self._state: tuple[Tensor, Tensor, int, Tensor, list[int], list[int]] | None = None

    def dispatch(self, hidden_states: Tensor, probs: Tensor, top_indices: Tensor, /
                 ) -> tuple[Tensor, Tensor, Tensor]:
        """`[T, h]`, `[T, k]`, `[T, k]` -> rows `[M, h]` grouped by local expert,
        `tokens_per_expert [E_local]`, probs `[M]` (M: the rows this rank's experts receive)."""
        topk = top_indices.shape[1]
        pairs = top_indices.reshape(-1)  # [T * k]; index E marks a dropped pair
        counts = expert_counts(pairs, self.num_experts + 1)[: self.num_experts]  # [E]
        send_counts = counts.view(self.ep_size, self.num_local_experts)  # [ep, E_local]
        recv_counts = torch.empty_like(send_counts)
        if self.group is not None:
            _all_to_all_single(recv_counts, send_counts, group=self.group)
        else:
            recv_counts.copy_(send_counts)
        sent = _host_rows(send_counts)  # the split sizes are needed on the host
        received = _host_rows(recv_counts)
        input_splits = [sum(row) for row in sent]
        output_splits = [sum(row) for row in received]
        num_rows = sum(input_splits)
        order = torch.sort(pairs, stable=True).indices[:num_rows]  # pair ids by global expert
        row_of_pair = torch.full_like(pairs, num_rows)  # dropped pairs read row N (zeros)
        row_of_pair[order] = torch.arange(num_rows, device=pairs.device)
        token_of_row = torch.div(order, topk, rounding_mode="floor")  # [N]
        rows = permute_tokens(hidden_states, token_of_row, row_of_pair, topk)  # [N, h]
        row_probs = probs.reshape(-1)[order]  # [N]
        if self.group is not None:
            rows = all_to_all(rows, output_splits, input_splits, self.group)  # [M, h]
            row_probs = all_to_all(row_probs.unsqueeze(-1), output_splits, input_splits,
                                   self.group).squeeze(-1)  # [M]
        regroup = _chunk_order(received, rows.device)  # [M]
        self._state = (token_of_row, row_of_pair, topk, regroup, input_splits, output_splits)
        tokens_per_expert = torch.tensor([sum(row[e] for row in received)
                                          for e in range(self.num_local_experts)],
                                         dtype=torch.int64, device=hidden_states.device)
        return rows.index_select(0, regroup), tokens_per_expert, row_probs.index_select(0, regroup)

    def combine(self, expert_output: Tensor, /) -> Tensor:
        """Rows `[M, h]` (already prob-weighted) -> `[T, h]`: back to their ranks, summed."""
        if self._state is None:
            raise RuntimeError("MoEAlltoAllTokenDispatcher.combine called before dispatch")
        token_of_row, row_of_pair, topk, regroup, input_splits, output_splits = self._state
        self._state = None
        rows = expert_output.index_select(0, torch.argsort(regroup))  # [M, h] by source rank
        if self.group is not None:
            rows = all_to_all(rows, input_splits, output_splits, self.group)  # [N, h]
        return unpermute_tokens(rows, token_of_row, row_of_pair, topk)  # [T, h]
