"""The typed channel that carries MoE auxiliary losses from the routers to the training loss.

The model owns one `MoEAuxLossTracker` and hands it to every module that reports auxiliary
losses (`AuxLossReporter`, e.g. `TopKRouter`) when it is built; each training forward records
the coefficient-weighted losses there, and the training step adds `total()` to the language
model loss and reports `summary()` separately. No module-level state: two models never mix.

Under pipeline parallelism no stage but the last sees the loss, so the tracker switches to
*attaching* (`attach_to_activations`, Megatron-Core's `MoEAuxLossAutoScaler`): the router
hands its output activation to `attach`, which returns it unchanged through an autograd
function whose backward gives each recorded loss the gradient `grad_scale` (d aux / d aux
times the scale the schedule applies to the main loss). The backward of the activation thus
carries the auxiliary losses' gradients into the router, on whichever stage it lives, and no
stage has to return them. The losses that reached a backward are summed for the progress
line (`take_attached`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from protoformer.parallel.mappings import apply_autograd_function

__all__ = ["AuxLossReporter", "ExpertBiasOwner", "MoEAuxLossAutoScaler", "MoEAuxLossTracker",
           "bind_aux_loss_tracker", "update_expert_biases"]


class MoEAuxLossTracker:
    """Auxiliary losses recorded during the current forward, by name (one entry per layer)."""

    def __init__(self) -> None:
        self._losses: dict[str, list[Tensor]] = {}
        self._grad_scale: float | None = None  # set: attach to activations (pipeline mode)
        self._pending: list[Tensor] = []  # recorded, not yet attached (attach mode)
        self._attached: Tensor | None = None  # [] sum of the attached losses that reached a backward
        self._paused = False

    def record(self, name: str, value: Tensor) -> None:
        """Add one layer's scalar loss (already multiplied by its coefficient)."""
        if self._grad_scale is not None:
            self._pending.append(value)
            return
        self._losses.setdefault(name, []).append(value)

    def clear(self) -> None:
        """Forget the recorded losses (the model calls this at the start of each forward)."""
        self._losses.clear()

    # -- pipeline parallelism: the losses ride on the activations' backward ------------------

    def attach_to_activations(self, grad_scale: float) -> None:
        """From now on `record` keeps the losses for `attach`, whose backward gives each the
        gradient `grad_scale` (the factor the main loss's gradient gets per micro-batch)."""
        self._grad_scale = grad_scale

    @property
    def attaching(self) -> bool:
        return self._grad_scale is not None

    @property
    def paused(self) -> bool:
        """True while a forward that is not a training micro-batch runs (`pause`)."""
        return self._paused

    @contextlib.contextmanager
    def pause(self) -> Generator[None, None, None]:
        """A forward run for another purpose (the pipeline's shape inference on placeholder
        tensors): the routers neither record losses nor count tokens during it."""
        self._paused, before = True, self._paused
        try:
            yield
        finally:
            self._paused = before

    def attach(self, activation: Tensor) -> Tensor:
        """`activation` with the losses recorded since the last call attached (attach mode);
        `activation` itself otherwise."""
        if self._grad_scale is None or not self._pending:
            return activation
        losses, self._pending = self._pending, []
        return apply_autograd_function(MoEAuxLossAutoScaler, activation, self, self._grad_scale,
                                       *losses)

    def take_attached(self) -> Tensor | None:
        """The sum `[]` of the attached losses whose backward ran since the last call (the
        step's micro-batches); None when none ran. Resets the sum."""
        if self._pending:
            raise RuntimeError(
                "MoEAuxLossTracker: auxiliary losses were recorded but never attached to an "
                "activation (a router that records them must return `tracker.attach(output)`), "
                "so their gradients would be lost under pipeline parallelism")
        attached, self._attached = self._attached, None
        return attached

    def _reached_backward(self, losses: tuple[Tensor, ...]) -> None:
        total = torch.stack([loss.float() for loss in losses]).sum()
        self._attached = total if self._attached is None else self._attached + total

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


class MoEAuxLossAutoScaler(torch.autograd.Function):
    """Identity on `activation`; its backward also returns `grad_scale` as the gradient of each
    attached loss (Megatron-Core's `MoEAuxLossAutoScaler`), and tells the tracker they ran."""

    @staticmethod
    def forward(ctx: Any, activation: Tensor, tracker: MoEAuxLossTracker, grad_scale: float,
                *losses: Tensor) -> Tensor:
        ctx.tracker = tracker
        ctx.grad_scale = grad_scale
        ctx.losses = tuple(loss.detach() for loss in losses)  # [] each, for the progress line
        return activation.view_as(activation)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor | None, ...]:
        losses: tuple[Tensor, ...] = ctx.losses
        tracker: MoEAuxLossTracker = ctx.tracker
        tracker._reached_backward(losses)  # pyright: ignore[reportPrivateUsage]  # the tracker's own function
        scale: float = ctx.grad_scale
        return (grad_outputs[0], None, None,
                *(torch.full_like(loss, scale) for loss in losses))


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


def update_expert_biases(module: nn.Module, groups: Sequence[ProcessGroup | None]) -> None:
    """`update_expert_bias(groups)` on every `ExpertBiasOwner` inside `module` (the routers of
    the layers this rank holds)."""
    for child in module.modules():
        if isinstance(child, ExpertBiasOwner):
            child.update_expert_bias(groups)
