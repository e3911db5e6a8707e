"""Token permutation for MoE on one rank: sort the routed (token, expert) pairs by expert,
gather the token rows, and sum each token's expert outputs back.

Both directions are *gathers*, forward and backward: a token's `k` rows sit at known
positions (`row_of_pair`), so the gradient of the permutation is a gather plus a sum over
`k`, and the gradient of the combine is a gather of the output gradient. No scatter-add, no
atomics, deterministic, and no host sync when dropless.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from protoformer.config import TransformerConfig
from protoformer.parallel.groups import ProcessGroups
from protoformer.parallel.mappings import apply_autograd_function

__all__ = ["MoELocalTokenDispatcher", "expert_counts", "permute_tokens", "unpermute_tokens"]


def expert_counts(indices: Tensor, num_bins: int) -> Tensor:
    """How many of `indices` (any shape, values in `0..num_bins-1`) fall in each bin, int64
    `[num_bins]`, without the host sync of `torch.bincount` on CUDA."""
    flat = indices.reshape(-1)
    counts = torch.zeros(num_bins, dtype=torch.int64, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


def _gather_pairs(rows: Tensor, row_of_pair: Tensor, topk: int, num_rows: int) -> Tensor:
    """`rows [N, h]` -> per token the sum of its `k` rows `[T, h]`; pairs whose row is `N`
    (dropped) read a zero row."""
    if row_of_pair.numel() and num_rows < row_of_pair.numel():  # some pairs were dropped
        rows = torch.cat((rows, rows.new_zeros(1, rows.shape[1])))  # [N + 1, h]
    gathered = rows.index_select(0, row_of_pair)  # [T * k, h]
    return gathered.view(-1, topk, rows.shape[1]).sum(dim=1)  # [T, h]


class _Permute(torch.autograd.Function):
    """`hidden [T, h]` -> `hidden[token_of_row]` `[N, h]`; backward sums each token's rows."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, token_of_row: Tensor, row_of_pair: Tensor,
                topk: int) -> Tensor:
        ctx.save_for_backward(row_of_pair)
        ctx.topk = topk
        return hidden.index_select(0, token_of_row)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor | None, ...]:
        (row_of_pair,) = ctx.saved_tensors
        grad = grad_outputs[0]
        return _gather_pairs(grad, row_of_pair, ctx.topk, grad.shape[0]), None, None, None


class _Unpermute(torch.autograd.Function):
    """`rows [N, h]` -> per token the sum of its rows `[T, h]`; backward gathers by token."""

    @staticmethod
    def forward(ctx: Any, rows: Tensor, token_of_row: Tensor, row_of_pair: Tensor,
                topk: int) -> Tensor:
        ctx.save_for_backward(token_of_row)
        return _gather_pairs(rows, row_of_pair, topk, rows.shape[0])

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor | None, ...]:
        (token_of_row,) = ctx.saved_tensors
        return grad_outputs[0].index_select(0, token_of_row), None, None, None


def permute_tokens(hidden: Tensor, token_of_row: Tensor, row_of_pair: Tensor, topk: int) -> Tensor:
    """`hidden [T, h]` -> routed rows `[N, h]` (row r is token `token_of_row[r]`)."""
    return apply_autograd_function(_Permute, hidden, token_of_row, row_of_pair, topk)


def unpermute_tokens(rows: Tensor, token_of_row: Tensor, row_of_pair: Tensor, topk: int) -> Tensor:
    """Routed rows `[N, h]` -> `[T, h]`, token t the sum of rows `row_of_pair[t*k:(t+1)*k]`."""
    return apply_autograd_function(_Unpermute, rows, token_of_row, row_of_pair, topk)


class MoELocalTokenDispatcher:
    """The dispatcher of a single expert-parallel rank: every expert is local.

    `dispatch` sorts the `T * k` (token, expert) pairs by expert (stable, so a token's rows
    keep token order within an expert), drops pairs marked dropped by the router (index
    `num_moe_experts`), and gathers the rows; `combine` sums each token's rows back.
    """

    def __init__(self, num_local_experts: int, local_expert_offset: int, /, *,
                 config: TransformerConfig, pg: ProcessGroups | None = None) -> None:
        del pg  # one rank: nothing to exchange
        if config.num_moe_experts is None or num_local_experts != config.num_moe_experts \
                or local_expert_offset != 0:
            raise ValueError(
                f"MoELocalTokenDispatcher serves all {config.num_moe_experts} experts on one "
                f"rank, got num_local_experts={num_local_experts}, offset={local_expert_offset}; "
                "use an expert-parallel dispatcher for expert_model_parallel_size > 1")
        self.num_experts = num_local_experts
        self.may_drop = config.moe_expert_capacity_factor is not None
        self._state: tuple[Tensor, Tensor, int] | None = None

    def dispatch(self, hidden_states: Tensor, probs: Tensor, top_indices: Tensor, /
                 ) -> tuple[Tensor, Tensor, Tensor]:
        """`[T, h]`, `[T, k]`, `[T, k]` -> rows `[N, h]`, `tokens_per_expert [E]`, probs `[N]`."""
        topk = top_indices.shape[1]
        pairs = top_indices.reshape(-1)  # [T * k]
        counts = expert_counts(pairs, self.num_experts + 1)  # [E + 1], the last = dropped
        tokens_per_expert = counts[: self.num_experts]
        order = torch.sort(pairs, stable=True).indices  # [T * k] pair ids grouped by expert
        num_rows = pairs.numel()
        if self.may_drop:
            num_rows = int(tokens_per_expert.sum())  # host sync, only with a capacity
            order = order[:num_rows]
        row_of_pair = torch.full_like(pairs, num_rows)  # dropped pairs read row N (zeros)
        row_of_pair[order] = torch.arange(num_rows, device=pairs.device)
        token_of_row = torch.div(order, topk, rounding_mode="floor")  # [N]
        self._state = (token_of_row, row_of_pair, topk)
        rows = permute_tokens(hidden_states, token_of_row, row_of_pair, topk)  # [N, h]
        return rows, tokens_per_expert, probs.reshape(-1)[order]

    def combine(self, expert_output: Tensor, /) -> Tensor:
        """Rows `[N, h]` -> `[T, h]`: each token's (already prob-weighted) rows summed."""
        if self._state is None:
            raise RuntimeError("MoELocalTokenDispatcher.combine called before dispatch")
        token_of_row, row_of_pair, topk = self._state
        self._state = None
        return unpermute_tokens(expert_output, token_of_row, row_of_pair, topk)
