"""The loss-curve PNG (matplotlib is optional: without it, no plot)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, cast

__all__ = ["plot_losses"]


class _Axes(Protocol):
    """The part of matplotlib's Axes used here (its stubs leave **kwargs untyped)."""

    def plot(self, x: list[int], y: list[float], *, label: str, linewidth: float = ...,
             marker: str = ...) -> object: ...

    def set_xlabel(self, label: str) -> object: ...

    def set_ylabel(self, label: str) -> object: ...

    def set_title(self, label: str) -> object: ...

    def grid(self, *, alpha: float) -> object: ...

    def legend(self) -> object: ...


class _Figure(Protocol):
    def savefig(self, fname: str, *, dpi: int) -> object: ...


def plot_losses(train_losses: list[tuple[int, float]], validation_losses: list[tuple[int, float]],
                path: Path, *, title: str = "") -> Path | None:
    """Write a PNG of the loss curves; None (nothing written) when matplotlib is missing."""
    try:
        # The Figure API, not pyplot: no global backend switch, no window, no figure registry.
        from matplotlib.figure import Figure
    except ImportError:
        return None
    figure = Figure(figsize=(7, 4))
    axes = cast("_Axes", figure.add_subplot())
    if train_losses:
        axes.plot([s for s, _ in train_losses], [v for _, v in train_losses],
                  label="train", linewidth=1)
    if validation_losses:
        axes.plot([s for s, _ in validation_losses], [v for _, v in validation_losses],
                  label="validation", marker="o")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats per token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    cast("_Figure", figure).savefig(str(path), dpi=100)
    return path
