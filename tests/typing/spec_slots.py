"""Typing test: a small Builder/Interface protocol pair and a Submodules record that uses it.

Only type-checked (see README.md), never run. Lines without an ignore comment must be
accepted by pyright and mypy; each line with an ignore comment must be rejected by both.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
from torch import Tensor, nn

from protoformer.spec import Submodules, apply_module, not_none


class GateInterface(Protocol):
    def forward(self, x: Tensor, /) -> tuple[Tensor, Tensor | None]: ...

    def backward_dw(self) -> None: ...


class GateBuilder(Protocol):
    def __call__(self, size: int, /, *, bias: bool) -> GateInterface: ...


class Gate(nn.Module):
    def __init__(self, size: int, /, *, bias: bool) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size)) if bias else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        return x * self.scale, self.bias

    def backward_dw(self) -> None:
        return None


def make_gate(size: int, /, *, bias: bool) -> Gate:
    return Gate(size, bias=bias)


class GateWithOption(Gate):
    """Requires an option the protocol never passes: fits the slot only with it bound."""

    def __init__(self, size: int, /, *, bias: bool, scale: float) -> None:
        super().__init__(size, bias=bias)
        self.init_scale = scale


class GateWithoutBias(nn.Module):
    """Lacks the `bias` keyword the protocol passes."""

    def __init__(self, size: int, /) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        return x, None

    def backward_dw(self) -> None:
        return None


class GateReturningTensor(nn.Module):
    """Its forward returns a bare Tensor, not (output, bias)."""

    def __init__(self, size: int, /, *, bias: bool) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        return x


class GateWithoutBackwardDw(nn.Module):
    def __init__(self, size: int, /, *, bias: bool) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        return x, None


@dataclass
class GateSubmodules(Submodules):
    gate: GateBuilder
    extra_gate: GateBuilder | None = None


@dataclass
class OuterSubmodules(Submodules):
    inner: GateSubmodules
    gate: GateBuilder


# Correct wirings: both checkers accept.
GateSubmodules(gate=Gate)
GateSubmodules(gate=make_gate, extra_gate=None)
GateSubmodules(gate=Gate, extra_gate=make_gate)
GateSubmodules(gate=partial(GateWithOption, scale=2.0))
OuterSubmodules(inner=GateSubmodules(gate=Gate), gate=make_gate)

# Miswirings: both checkers reject.
GateSubmodules(gate=GateWithoutBias)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
GateSubmodules(gate=GateWithOption)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
GateSubmodules(gate=GateReturningTensor)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
GateSubmodules(gate=GateWithoutBackwardDw)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
GateSubmodules(gate=Gate, extra_gate=GateWithoutBias)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
GateSubmodules(gate=None)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
GateSubmodules(gate={"module": Gate, "params": {}})  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
OuterSubmodules(inner=Gate, gate=Gate)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]

# Known static hole, caught only at runtime by check_builder: nn.Module.__call__ is typed
# `Callable[..., Any]`, so a module *instance* fits any Builder protocol for both checkers.
GateSubmodules(gate=Gate(4, bias=True))

# apply_module: the built submodule is called with its forward's signature.
layer = Gate(4, bias=True)
x = torch.ones(2, 4)
out, bias = apply_module(layer)(x)
checked_out: Tensor = out
checked_bias: Tensor = not_none(bias, "bias")
wrong: int = apply_module(layer)(x)  # type: ignore[assignment]  # pyright: ignore[reportAssignmentType]
apply_module(layer)(x, x)  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]
apply_module(layer)("x")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
