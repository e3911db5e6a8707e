"""How data-parallel replicas share the gradients of a global batch: the `DataParallel` protocol.

A training step calls the model through `DataParallel.module`, runs backward once per
micro-batch (all but the last inside `accumulating()`, so no gradient communication happens
until the last), then `finish_grads()` completes the gradients: summed over the
tensor-parallel group where a rank holds a partial gradient, averaged over the data-parallel
group. The training loop knows nothing else about the wrapper, so adding one (FSDP2, a
pipeline stage) adds a class here, not branches to the loop.

`ReplicatedDataParallel` is the default: `DistributedDataParallel` over `pg.dp` (every replica
holds the whole tensor-parallel shard and its optimizer state), or no wrapper with one
replica. Deferred weight gradients (`config.delay_wgrad_compute`) fill `.grad` after
backward, where DDP's hooks cannot see them; with those the model is left unwrapped and
`finish_grads` averages over the replicas in one coalesced all-reduce instead; so it is
with `wrap=False`, which pipeline stages use (the pipeline schedule runs their backward
passes, not a DDP-wrapped forward).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator
from typing import Protocol, cast, runtime_checkable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from protoformer.parallel.grads import (
    compute_deferred_weight_grads,
    finalize_model_grads,
    is_expert_parallel,
    reduce_expert_grads,
)
from protoformer.parallel.groups import ProcessGroups

__all__ = ["DataParallel", "ReplicatedDataParallel"]

# torch's way to leave parameters out of DDP (unannotated there; this is how it is called).
_ignore_in_ddp = cast("Callable[[nn.Module, list[str]], None]",
                      DistributedDataParallel._set_params_and_buffers_to_ignore_for_model)  # pyright: ignore[reportPrivateUsage, reportUnknownMemberType]


@runtime_checkable
class DataParallel(Protocol):
    """A model prepared for data parallelism over `pg.dp`, as a training step drives it."""

    @property
    def name(self) -> str:
        """How the run's messages call it (`DDP`, `FSDP2`, ...)."""
        ...

    @property
    def module(self) -> nn.Module:
        """What the forward is called on (the wrapper, or the model itself)."""
        ...

    def accumulating(self) -> contextlib.AbstractContextManager[None]:
        """Context for the backward of a micro-batch that is not the step's last: gradients
        accumulate locally, without data-parallel communication."""
        ...

    def finish_grads(self) -> None:
        """After the step's last backward: complete every gradient (deferred weight
        gradients, tensor-parallel partial sums, the data-parallel average)."""
        ...


class ReplicatedDataParallel:
    """`DistributedDataParallel` over `pg.dp` (no wrapper with one replica, deferred wgrads or
    `wrap=False`: then `finish_grads` all-reduces the gradients itself)."""

    def __init__(self, model: nn.Module, pg: ProcessGroups, device: torch.device, *,
                 delay_wgrad_compute: bool = False, wrap: bool = True) -> None:
        self._model = model
        self._pg = pg
        self._deferred = delay_wgrad_compute
        self._ddp: DistributedDataParallel | None = None
        # Under expert parallelism the routed experts differ between EP ranks: DDP neither
        # broadcasts nor averages them; `finish_grads` reduces them over `pg.expt_dp`.
        self._experts = [param for param in model.parameters()
                         if pg.ep_size > 1 and is_expert_parallel(param)]
        if pg.dp_size > 1 and not delay_wgrad_compute and wrap:
            device_ids = [device.index] if device.type == "cuda" else None
            if self._experts:
                ignored = [name for name, param in model.named_parameters()
                           if is_expert_parallel(param)]
                _ignore_in_ddp(model, ignored)
            # Buffers are derived tables, equal everywhere: not broadcast each step. The
            # parameters are broadcast once from the group's first rank when wrapping.
            self._ddp = DistributedDataParallel(model, device_ids=device_ids,
                                                process_group=pg.dp, broadcast_buffers=False)

    @property
    def name(self) -> str:
        return "DDP" if self._ddp is not None else "replicated"

    @property
    def module(self) -> nn.Module:
        return self._ddp if self._ddp is not None else self._model

    @contextlib.contextmanager
    def accumulating(self) -> Generator[None, None, None]:
        if self._ddp is None:
            yield
            return
        with self._ddp.no_sync():
            yield

    def finish_grads(self) -> None:
        if self._deferred:
            compute_deferred_weight_grads(self._model)
        finalize_model_grads(self._model, self._pg, reduce_data_parallel=self._ddp is None)
        if self._ddp is not None and self._experts:
            reduce_expert_grads([p.grad for p in self._experts if p.grad is not None], self._pg)
