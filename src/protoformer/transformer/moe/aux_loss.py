"""The typed channel that carries MoE auxiliary losses from the routers to the training loss.

The model owns one `MoEAuxLossTracker` and hands it to every module that reports auxiliary
losses (`AuxLossReporter`, e.g. `TopKRouter`) when it is built; each training forward records
the coefficient-weighted losses there, and the training step adds `total()` to the language
model loss and reports `summary()` separately. No module-level state: two models never mix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup

__all__ = ["AuxLossReporter", "ExpertBiasOwner", "MoEAuxLossTracker", "bind_aux_loss_tracker"]


class MoEAuxLossTracker:
    """Auxiliary losses recorded during the current forward, by name (one entry per layer)."""

    def __init__(self) -> None:
        self._losses: dict[str, list[Tensor]] = {}

    def record(self, name: str, value: Tensor) -> None:
        """Add one layer's scalar loss (already multiplied by its coefficient)."""
        self._losses.setdefault(name, []).append(value)

    def clear(self) -> None:
        """Forget the recorded losses (the model calls this at the start of each forward)."""
        self._losses.clear()

    def total(self) -> Tensor | None:
        """The sum of every recorded loss, to add to the training loss; None when none."""
        values = [value for losses in self._losses.values() for value in losses]
        if not values:
            return None
        return torch.stack([value.float() for value in values]).sum()

    def summary(self) -> dict[str, float]:
        """Each loss summed over layers, as floats for a progress line."""
        return {name: float(torch.stack([v.detach().float() for v in values]).sum())
                for name, values in self._losses.items() if values}


@runtime_checkable
class AuxLossReporter(Protocol):
    """A module that records auxiliary losses into its model's tracker."""

    def set_aux_loss_tracker(self, tracker: MoEAuxLossTracker | None, /) -> None: ...


@runtime_checkable
class ExpertBiasOwner(Protocol):
    """A router with an aux-loss-free expert bias, updated once per optimizer step."""

    def update_expert_bias(self, groups: Sequence[ProcessGroup | None], /) -> None: ...


def bind_aux_loss_tracker(model: nn.Module, tracker: MoEAuxLossTracker) -> int:
    """Give `tracker` to every `AuxLossReporter` inside `model`; returns how many there are."""
    count = 0
    for module in model.modules():
        if isinstance(module, AuxLossReporter):
            module.set_aux_loss_tracker(tracker)
            count += 1
    return count
