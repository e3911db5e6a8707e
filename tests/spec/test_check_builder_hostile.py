"""check_builder and Submodules facing hostile or odd user objects, and bound simple values.

Every exception user code raises while a builder is inspected becomes a `SpecError` naming
the slot; a `__wrapped__` loop ends (it used to spin forever inside typing.get_type_hints);
keywords bound by a partial are checked against simple annotations as pyright checks them.
Each test runs in a subprocess-free, bounded way: a hang would be caught by the timeout
helper below rather than blocking the suite.
"""

import dataclasses
import functools
import threading
from collections.abc import Callable
from typing import Literal, Protocol

import pytest
import torch
from torch import Tensor, nn

from protoformer.spec import SpecError, Submodules, check_builder


class ProjInterface(Protocol):
    def forward(self, hidden_states: Tensor, /) -> tuple[Tensor, Tensor | None]: ...


class ProjBuilder(Protocol):
    def __call__(self, input_size: int, output_size: int, /, *, bias: bool) -> ProjInterface: ...


class OptionProj(nn.Module):
    """A row linear with typed options that a partial binds (like `fp8_margin` of a user layer)."""

    def __init__(self, input_size: int, output_size: int, /, *, bias: bool, fp8_margin: int,
                 scale: float = 1.0, name: str | None = None,
                 recipe: Literal["delayed", "current"] = "delayed", enabled: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(output_size, input_size))

    def forward(self, hidden_states: Tensor, /) -> tuple[Tensor, Tensor | None]:
        return hidden_states @ self.weight.t(), None


def _bounded(call: Callable[[], None], seconds: float = 20.0) -> BaseException | None:
    """Run `call` in a daemon thread; fail the test if it does not finish in `seconds`."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            call()
        except BaseException as error:  # handed to the test
            outcome.append(error)
        else:
            outcome.append(None)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"check did not finish within {seconds} s (an endless loop)"
    return outcome[0]


# ---------------------------------------------------------------------------------------------
# User exceptions during inspection.


class RaisingSignature:
    """A callable instance whose `__signature__` property raises."""

    @property
    def __signature__(self) -> object:
        raise RuntimeError("signature exploded")

    def __call__(self, input_size: int, output_size: int, /, *, bias: bool) -> OptionProj:
        return OptionProj(input_size, output_size, bias=bias, fp8_margin=0)


class RaisingRepr:
    def __repr__(self) -> str:
        raise RuntimeError("repr exploded")


class RaisingHash:
    """A callable instance whose hash raises something other than TypeError."""

    def __hash__(self) -> int:
        raise RuntimeError("hash exploded")

    def __call__(self, input_size: int, output_size: int, /, *, bias: bool) -> OptionProj:
        return OptionProj(input_size, output_size, bias=bias, fp8_margin=0)


class RaisingGetattr:
    """A callable instance whose every missing attribute lookup raises."""

    def __getattr__(self, name: str) -> object:
        raise RuntimeError(f"getattr {name} exploded")

    def __call__(self, input_size: int, output_size: int, /, *, bias: bool) -> OptionProj:
        return OptionProj(input_size, output_size, bias=bias, fp8_margin=0)


def _hostile_builders() -> list[object]:
    return [
        RaisingSignature(),
        functools.partial(OptionProj, RaisingRepr(), fp8_margin=0),  # a bound arg with a bad repr
        RaisingGetattr(),
    ]


@pytest.mark.parametrize("index", range(3), ids=["signature", "repr", "getattr"])
def test_user_exceptions_during_inspection_become_spec_errors_naming_the_slot(index: int) -> None:
    builder = _hostile_builders()[index]
    with pytest.raises(SpecError) as info:
        check_builder(builder, ProjBuilder, slot="MySubmodules.linear_proj")
    assert str(info.value).startswith("MySubmodules.linear_proj: ")


def test_raising_hash_is_checked_without_the_cache() -> None:
    # The hash fails, so the result is computed every time; the builder itself conforms.
    check_builder(RaisingHash(), ProjBuilder, slot="S.linear_proj")


def test_submodules_record_reports_a_hostile_builder_as_spec_error() -> None:
    @dataclasses.dataclass
    class HostileSubmodules(Submodules):
        linear_proj: ProjBuilder

    with pytest.raises(SpecError, match=r"HostileSubmodules\.linear_proj: .*RuntimeError"):
        HostileSubmodules(linear_proj=RaisingSignature())


def test_wrapped_loop_ends_with_a_spec_error() -> None:
    def loop(input_size: int, output_size: int, /, *, bias: bool) -> OptionProj:
        return OptionProj(input_size, output_size, bias=bias, fp8_margin=0)

    loop.__wrapped__ = loop  # type: ignore[attr-defined]

    def check() -> None:
        check_builder(loop, ProjBuilder, slot="S.linear_proj")

    error = _bounded(check)
    assert isinstance(error, SpecError), error
    assert str(error).startswith("S.linear_proj: ")


def test_wrapped_loop_inside_a_partial_ends() -> None:
    def loop(input_size: int, output_size: int, /, *, bias: bool, fp8_margin: int) -> OptionProj:
        return OptionProj(input_size, output_size, bias=bias, fp8_margin=fp8_margin)

    loop.__wrapped__ = loop  # type: ignore[attr-defined]

    def check() -> None:
        check_builder(functools.partial(loop, fp8_margin=1), ProjBuilder, slot="S.linear_proj")

    error = _bounded(check)
    assert isinstance(error, SpecError), error


def test_huge_bound_value_is_quoted_by_a_short_prefix() -> None:
    with pytest.raises(SpecError) as info:
        check_builder(functools.partial(OptionProj, "x" * 1_000_000), ProjBuilder, slot="S.p")
    assert len(str(info.value)) < 2_000


# ---------------------------------------------------------------------------------------------
# Keyword values bound by a partial, against simple annotations (pyright's judgement).


@pytest.mark.parametrize(
    "keywords",
    [
        {"fp8_margin": 0},
        {"fp8_margin": True},  # pyright: bool is assignable to int
        {"fp8_margin": 1, "scale": 2},  # int is assignable to float
        {"fp8_margin": 1, "scale": 0.5, "name": None},
        {"fp8_margin": 1, "name": "proj"},
        {"fp8_margin": 1, "recipe": "current"},
        {"fp8_margin": 1, "enabled": False},
    ],
)
def test_partial_with_fitting_simple_values_passes(keywords: dict[str, object]) -> None:
    check_builder(functools.partial(OptionProj, **keywords), ProjBuilder, slot="S.linear_proj")


@pytest.mark.parametrize(
    ("keywords", "expected"),
    [
        ({"fp8_margin": "0"}, "binds fp8_margin='0' (a str), but the builder declares fp8_margin: int"),
        ({"fp8_margin": 1.5}, "declares fp8_margin: int"),
        ({"fp8_margin": None}, "declares fp8_margin: int"),
        ({"fp8_margin": 1, "scale": "1.0"}, "declares scale: float"),
        ({"fp8_margin": 1, "name": 3}, "declares name: str | None"),
        ({"fp8_margin": 1, "recipe": "tensorwise"}, "declares recipe: Literal['delayed', 'current']"),
        ({"fp8_margin": 1, "enabled": 1}, "declares enabled: bool"),
    ],
)
def test_partial_with_wrong_simple_values_is_rejected(keywords: dict[str, object],
                                                      expected: str) -> None:
    with pytest.raises(SpecError) as info:
        check_builder(functools.partial(OptionProj, **keywords), ProjBuilder, slot="S.linear_proj")
    assert expected in str(info.value)


def test_literal_values_are_part_of_the_cache_key() -> None:
    good = functools.partial(OptionProj, fp8_margin=1, recipe="current")
    bad = functools.partial(OptionProj, fp8_margin=1, recipe="other")
    check_builder(good, ProjBuilder, slot="S.p")
    with pytest.raises(SpecError, match="recipe"):
        check_builder(bad, ProjBuilder, slot="S.p")
    check_builder(good, ProjBuilder, slot="S.p")
