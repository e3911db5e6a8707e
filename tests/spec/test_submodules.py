"""Submodules records validate every slot at construction; apply_module and not_none."""

import dataclasses
import types
from dataclasses import dataclass
from typing import Optional, Protocol

import pytest
import torch
from torch import Tensor, nn

from protoformer.spec import SpecError, Submodules, apply_module, not_none, validate_submodules
from protoformer.spec.submodules import slot_protocols

# ---------------------------------------------------------------------------------------------
# Protocols, builders and records (module-level so the annotations resolve at runtime).


class ProjInterface(Protocol):
    def forward(self, hidden_states: Tensor, /) -> tuple[Tensor, Tensor | None]: ...


class ProjBuilder(Protocol):
    def __call__(self, input_size: int, output_size: int, /, *, bias: bool) -> ProjInterface: ...


class NormInterface(Protocol):
    def forward(self, x: Tensor, /) -> Tensor: ...


class NormBuilder(Protocol):
    def __call__(self, hidden_size: int, /, *, eps: float) -> NormInterface: ...


class Proj(nn.Module):
    def __init__(self, input_size: int, output_size: int, /, *, bias: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(input_size, output_size, bias=bias)

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.linear(hidden_states), None


class Norm(nn.Module):
    def __init__(self, hidden_size: int, /, *, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x)


@dataclass
class InnerSubmodules(Submodules):
    norm: NormBuilder


@dataclass
class XSubmodules(Submodules):
    linear: ProjBuilder
    norm: NormBuilder
    q_norm: NormBuilder | None = None
    k_norm: Optional[NormBuilder] = None  # the typing.Optional spelling, on purpose
    inner: InnerSubmodules | None = None
    note: str = "not a slot"  # neither a builder protocol nor a record: not checked


@dataclass
class NestedRequiredSubmodules(Submodules):
    inner: InnerSubmodules
    linear: ProjBuilder


@dataclass
class DerivedSubmodules(XSubmodules):
    extra: NormBuilder | None = None


@dataclass
class UnresolvableSubmodules(Submodules):
    norm: "NotImportedBuilder"  # type: ignore[name-defined]  # noqa: F821 - the error under test


def _lines(error: SpecError) -> list[str]:
    return str(error).splitlines()


# ---------------------------------------------------------------------------------------------
# Correct wiring.


def test_correct_wiring_constructs_silently() -> None:
    spec = XSubmodules(linear=Proj, norm=Norm)
    assert spec.linear is Proj and spec.q_norm is None and spec.inner is None


def test_all_slots_filled_constructs_silently() -> None:
    inner = InnerSubmodules(norm=Norm)
    spec = XSubmodules(linear=Proj, norm=Norm, q_norm=Norm, k_norm=Norm, inner=inner)
    assert spec.inner is inner
    NestedRequiredSubmodules(inner=inner, linear=Proj)
    DerivedSubmodules(linear=Proj, norm=Norm, extra=Norm)


def test_slot_protocols_reports_each_field() -> None:
    assert slot_protocols(XSubmodules) == {
        "linear": (ProjBuilder, False),
        "norm": (NormBuilder, False),
        "q_norm": (NormBuilder, True),
        "k_norm": (NormBuilder, True),
        "inner": (InnerSubmodules, True),
        "note": (None, False),
    }


# ---------------------------------------------------------------------------------------------
# Miswiring.


@pytest.mark.parametrize(
    ("kwargs", "slot", "fragment"),
    [
        pytest.param({"linear": Norm, "norm": Norm}, "XSubmodules.linear", "ProjBuilder",
                     id="wrong-kind-in-required"),
        pytest.param({"linear": Proj, "norm": Proj}, "XSubmodules.norm", "NormBuilder",
                     id="linear-in-norm-slot"),
        pytest.param({"linear": Proj, "norm": Norm, "q_norm": Proj}, "XSubmodules.q_norm",
                     "NormBuilder", id="wrong-kind-in-optional"),
        pytest.param({"linear": Proj, "norm": Norm, "k_norm": Proj}, "XSubmodules.k_norm",
                     "NormBuilder", id="wrong-kind-in-typing-optional"),
        pytest.param({"linear": Proj, "norm": None}, "XSubmodules.norm", "is None",
                     id="none-in-required"),
        pytest.param({"linear": {"module": Proj, "params": {}}, "norm": Norm}, "XSubmodules.linear",
                     "is a value of type dict, not a builder", id="untyped-spec-dict"),
        pytest.param({"linear": types.SimpleNamespace(module=Proj, params={}), "norm": Norm},
                     "XSubmodules.linear", "not a builder", id="untyped-spec-object"),
        pytest.param({"linear": Proj(2, 2, bias=True), "norm": Norm}, "XSubmodules.linear",
                     "is a module instance", id="module-instance"),
        pytest.param({"linear": "Proj", "norm": Norm}, "XSubmodules.linear", "not a builder",
                     id="string"),
        pytest.param({"linear": Proj, "norm": Norm, "inner": {"norm": Norm}}, "XSubmodules.inner",
                     "expected a InnerSubmodules, got dict", id="untyped-nested-record"),
        pytest.param({"linear": Proj, "norm": Norm, "inner": Norm}, "XSubmodules.inner",
                     "expected a InnerSubmodules", id="builder-in-record-field"),
    ],
)
def test_each_miswiring_names_the_slot(kwargs: dict[str, object], slot: str, fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        XSubmodules(**kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith(f"{slot}: "), message
    assert fragment in message
    # Only that slot is reported.
    reported = {line.split(":")[0] for line in _lines(info.value) if not line.startswith(" ")}
    assert reported == {slot}


def test_several_bad_slots_reported_together() -> None:
    with pytest.raises(SpecError) as info:
        XSubmodules(linear=Norm, norm=None, q_norm=Proj, inner="inner")  # type: ignore[arg-type]
    message = str(info.value)
    for slot in ("XSubmodules.linear: ", "XSubmodules.norm: ", "XSubmodules.q_norm: ",
                 "XSubmodules.inner: "):
        assert sum(line.startswith(slot) for line in _lines(info.value)) == 1, (slot, message)
    # The builder mismatches are listed under their slot.
    assert "missing keyword parameter 'bias'" in message
    assert "missing keyword parameter 'eps'" in message


def test_nested_record_is_validated_when_it_is_built() -> None:
    with pytest.raises(SpecError, match=r"^InnerSubmodules\.norm: "):
        InnerSubmodules(norm=Proj)  # type: ignore[arg-type]


def test_nested_required_record_must_be_given() -> None:
    with pytest.raises(SpecError, match=r"NestedRequiredSubmodules\.inner: is None"):
        NestedRequiredSubmodules(inner=None, linear=Proj)  # type: ignore[arg-type]


def test_inherited_slots_are_checked_under_the_subclass_name() -> None:
    with pytest.raises(SpecError) as info:
        DerivedSubmodules(linear=Norm, norm=Norm, extra=Proj)  # type: ignore[arg-type]
    starts = {line.split(":")[0] for line in _lines(info.value) if not line.startswith(" ")}
    assert starts == {"DerivedSubmodules.linear", "DerivedSubmodules.extra"}


def test_replace_revalidates() -> None:
    spec = XSubmodules(linear=Proj, norm=Norm)
    with pytest.raises(SpecError, match=r"XSubmodules\.norm: "):
        dataclasses.replace(spec, norm=Proj)


def test_validate_submodules_after_mutation() -> None:
    spec = XSubmodules(linear=Proj, norm=Norm)
    spec.linear = Norm  # type: ignore[assignment]
    with pytest.raises(SpecError, match=r"XSubmodules\.linear: "):
        validate_submodules(spec)


def test_unresolvable_annotation_is_a_clear_spec_error() -> None:
    with pytest.raises(SpecError, match=r"NotImportedBuilder.*importable at runtime"):
        UnresolvableSubmodules(norm=Norm)


# ---------------------------------------------------------------------------------------------
# apply_module and not_none.


def test_apply_module_returns_the_same_module_and_runs_hooks() -> None:
    layer = Proj(3, 2, bias=True)
    calls: list[str] = []
    layer.register_forward_hook(lambda module, args, output: calls.append("hook"))
    applied = apply_module(layer)
    assert applied is layer
    out, bias = applied(torch.ones(4, 3))
    assert out.shape == (4, 2) and bias is None
    assert calls == ["hook"]


def test_apply_module_rejects_a_non_module() -> None:
    class NotAModule:
        def forward(self, x: Tensor) -> Tensor:
            return x

    with pytest.raises(TypeError, match=r"apply_module expects a built torch\.nn\.Module, got .*NotAModule; did a builder return a non-module"):
        apply_module(NotAModule())


def test_not_none() -> None:
    assert not_none(0) == 0
    assert not_none("") == ""
    value = [1]
    assert not_none(value) is value
    with pytest.raises(ValueError, match="the layer's bias is None"):
        not_none(None, "the layer's bias")
    with pytest.raises(ValueError, match="value is None"):
        not_none(None)
