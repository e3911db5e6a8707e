"""Builders and records for the spec serialization tests, importable by name.

Spec files name builders "module:QualName", so these live in a real module (imported as
`tests.spec.spec_testkit`: pytest puts the repository root on sys.path) and the tests pass
`allow=ALLOW` (protoformer plus "tests.spec.") so that `from_dict` may resolve them. The annotations are
module-level names because the runtime conformance check evaluates them.
"""

import enum
import functools
import os
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from protoformer.spec import Submodules

ALLOW = ("protoformer.", "tests.spec.")
SOME_CONSTANT = 3
run_command = os.system  # a re-export of a function defined outside the allowlist


class Color(enum.Enum):
    red = 1
    blue = 2


class NormInterface(Protocol):
    def forward(self, x: Tensor, /) -> Tensor: ...


class NormBuilder(Protocol):
    def __call__(self, hidden_size: int, /, *, eps: float) -> NormInterface: ...


class ProjInterface(Protocol):
    def forward(self, x: Tensor, /) -> tuple[Tensor, Tensor | None]: ...


class ProjBuilder(Protocol):
    def __call__(self, input_size: int, output_size: int, /, *, bias: bool) -> ProjInterface: ...


class BlockInterface(Protocol):
    def forward(self, x: Tensor, /) -> Tensor: ...


class BlockBuilder(Protocol):
    def __call__(self, hidden_size: int, /) -> BlockInterface: ...


class Norm(nn.Module):
    def __init__(self, hidden_size: int, *, eps: float, color: Color = Color.red,
                 dtype: torch.dtype | None = None, shape: tuple[int, ...] = (),
                 options: dict[str, object] | None = None, names: list[str] | None = None,
                 helper: object = None) -> None:
        super().__init__()
        self.hidden_size = hidden_size

    def forward(self, x: Tensor) -> Tensor:
        return x


class OtherNorm(Norm):
    pass


class Namespace:
    class NestedNorm(Norm):
        pass


def make_norm(hidden_size: int, /, *, eps: float) -> Norm:
    return Norm(hidden_size, eps=eps)


def _private_norm(hidden_size: int, /, *, eps: float) -> Norm:
    return Norm(hidden_size, eps=eps)


class Proj(nn.Module):
    def __init__(self, input_size: int, output_size: int, /, *, bias: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(input_size, output_size, bias=bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.linear(x), None


def scaled_proj(scale: float, input_size: int, output_size: int, /, *, bias: bool) -> Proj:
    del scale
    return Proj(input_size, output_size, bias=bias)


@dataclass
class InnerSubmodules(Submodules):
    norm: NormBuilder
    proj: ProjBuilder
    extra_norm: NormBuilder | None = None


class Block(nn.Module):
    def __init__(self, hidden_size: int, *, submodules: InnerSubmodules, scale: float = 1.0) -> None:
        super().__init__()
        self.hidden_size = hidden_size

    def forward(self, x: Tensor) -> Tensor:
        return x


@dataclass
class OuterSubmodules(Submodules):
    block: BlockBuilder
    inner: InnerSubmodules
    final_norm: NormBuilder | None = None
    label: str = "outer"  # plain data, not a slot


def small_spec() -> InnerSubmodules:
    return InnerSubmodules(norm=Norm, proj=Proj)


def full_spec() -> OuterSubmodules:
    """A spec that uses every kind of value a spec file can hold."""
    fancy_norm = functools.partial(
        Norm, eps=1e-3, color=Color.blue, dtype=torch.bfloat16, shape=(1, 2),
        options={"a": [1, 2.5, None, True, "text"], "b": {"c": "d"}, "e": []}, names=["x", "y"],
        helper=make_norm)
    inner = InnerSubmodules(norm=fancy_norm, proj=functools.partial(scaled_proj, 2.0),
                            extra_norm=make_norm)
    return OuterSubmodules(
        block=functools.partial(Block, submodules=inner, scale=0.5),
        inner=InnerSubmodules(norm=Namespace.NestedNorm, proj=Proj,
                              extra_norm=functools.partial(OtherNorm, helper=functools.partial(
                                  make_norm, eps=0.25))),
        final_norm=None,
        label='a "label" with \\ and\nnewline, tab\t, unicode é∑, control \x01',
    )
