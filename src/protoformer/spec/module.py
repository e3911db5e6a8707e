"""Helpers that keep the checker's view of built submodules precise."""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, Protocol, TypeVar, cast

__all__ = ["apply_module", "not_none"]

P = ParamSpec("P")
R_co = TypeVar("R_co", covariant=True)
T = TypeVar("T")


class _WithForward(Protocol[P, R_co]):
    def forward(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...


def apply_module(module: _WithForward[P, R_co]) -> Callable[P, R_co]:
    """Return `module` itself, typed as its `forward` (not `nn.Module.__call__`'s `Any`).

    Calling the result runs `module.__call__`, so hooks still fire. Raises `TypeError` when
    `module` is not an `nn.Module` (a builder returned something that is not a layer).
    """
    from torch import nn

    if not isinstance(module, nn.Module):
        raise TypeError(f"apply_module expects a built torch.nn.Module, got "
                        f"{type(module).__qualname__}; did a builder return a non-module?")
    return cast("Callable[P, R_co]", module)


def not_none(value: T | None, what: str = "value") -> T:
    """Return `value`, raising `ValueError` naming `what` when it is None."""
    if value is None:
        raise ValueError(f"{what} is None, but a value is required here")
    return value
