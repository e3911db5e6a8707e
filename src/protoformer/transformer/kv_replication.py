"""Replicated key/value heads: keeping their copies equal when `num_query_groups < tp`.

With fewer key/value heads than tensor-parallel ranks, attention gives each rank one key/value
head and each head is held by `tp / ng` ranks (see the fused layout in
`protoformer.transformer.attention`). `ReplicatedKeyValue` keeps those copies equal: at
construction every copy takes the values of the first one, and in backward each copy's
gradient is replaced by the sum over the copies (the gradient of the one shared head), by a
hook for ordinary backward or after `backward_dw()` for deferred weight gradients. The copies
held as duplicates are tagged so that a global gradient norm counts them once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from protoformer.parallel.grads import mark_duplicate_rows
from protoformer.parallel.groups import ProcessGroups
from protoformer.parallel.mappings import all_reduce_in_place
from protoformer.parallel.protocols import ColumnParallelLinearInterface

__all__ = ["ReplicatedKeyValue"]


class ReplicatedKeyValue:
    """The key/value rows of an attention layer's projections, tied over the ranks sharing a head.

    `replicas` ranks hold each key/value group (1 unless `num_query_groups < tp`, when tying is a
    no-op); this rank holds group `group_index`.
    """

    def __init__(self, pg: ProcessGroups, num_query_groups: int) -> None:
        self.pg = pg
        self.num_query_groups = num_query_groups
        self.replicas = max(1, pg.tp_size // num_query_groups)
        self.group_index = pg.tp_rank // self.replicas
        # Tied parameters and the row where their key/value part starts.
        self._params: list[tuple[nn.Parameter, int]] = []

    def tie(self, linear: ColumnParallelLinearInterface, rows: int, kv_offset: int) -> None:
        """Keep the replicated key/value rows of `linear` equal on the ranks sharing them.

        `rows` is the per-rank output size of `linear`; rows `kv_offset:` hold keys/values.
        Applies to every parameter whose first dimension is `rows` (weight and bias): the
        first copy's values are broadcast now, and each gradient is summed over the copies
        (by a hook in backward, or in `backward_dw` for deferred weight gradients).
        """
        if self.replicas == 1:
            return
        if not isinstance(linear, nn.Module):
            raise TypeError(f"{type(linear).__qualname__} is not a torch.nn.Module")
        for param in linear.parameters():
            if param.dim() == 0 or param.shape[0] != rows:
                continue
            with torch.no_grad():
                kv = param[kv_offset:]
                kv.copy_(self._sum_over_replicas(kv, first_copy_only=True))
            if self.pg.tp_rank % self.replicas != 0:
                mark_duplicate_rows(param, kv_offset)  # counted once in a global grad norm
            hook = self._make_grad_hook(kv_offset)
            param.register_hook(hook)  # type: ignore[no-untyped-call]  # pyright: ignore[reportUnknownMemberType]  # torch leaves it unannotated
            self._params.append((param, kv_offset))

    def backward_dw(self, linear: ColumnParallelLinearInterface) -> None:
        """`linear.backward_dw()`, then sum the new key/value gradient rows over the copies."""
        before = [(param, offset, None if param.grad is None else param.grad[offset:].clone())
                  for param, offset in self._params]
        linear.backward_dw()
        with torch.no_grad():
            for param, offset, old in before:
                if param.grad is None:
                    continue
                new = param.grad[offset:] if old is None else param.grad[offset:] - old
                summed = self._sum_over_replicas(new, first_copy_only=False)
                param.grad[offset:] = summed if old is None else old + summed

    def _make_grad_hook(self, kv_offset: int) -> Callable[[Tensor | None], Tensor | None]:
        def hook(grad: Tensor | None) -> Tensor | None:
            if grad is None:  # deferred to backward_dw (`delay_wgrad_compute`)
                return None
            grad = grad.clone()
            grad[kv_offset:] = self._sum_over_replicas(grad[kv_offset:], first_copy_only=False)
            return grad

        return hook

    def _sum_over_replicas(self, tensor: Tensor, *, first_copy_only: bool) -> Tensor:
        """Sum `tensor` over the ranks holding the same key/value group (or take the first copy)."""
        buffer = tensor.new_zeros((self.num_query_groups, *tensor.shape))  # [ng, ...]
        if not first_copy_only or self.pg.tp_rank % self.replicas == 0:
            buffer[self.group_index] = tensor
        all_reduce_in_place(buffer, self.pg.tp)
        return buffer[self.group_index]
