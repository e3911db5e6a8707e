"""check_builder: every builder kind, every mismatch kind, the message, and the cache.

The protocols and builders are module-level so that their annotations resolve at runtime
(check_builder evaluates them with typing.get_type_hints).
"""

import functools
import re
from pathlib import Path
from typing import Any, Protocol

import pytest
import torch
from torch import Tensor, nn

import protoformer.spec.check as check_module
from protoformer.spec import SpecError, check_builder, describe_builder

THIS_FILE = Path(__file__).resolve()


def _line_of(definition: str) -> int:
    """1-based line of `definition` (e.g. 'def make_proj(') in this file, found by text search."""
    for number, line in enumerate(THIS_FILE.read_text().splitlines(), start=1):
        if line.lstrip().startswith(definition):
            return number
    raise AssertionError(f"{definition!r} not found in {THIS_FILE}")


def _location(definition: str) -> str:
    return f"{THIS_FILE}:{_line_of(definition)}"


def _problems(error: SpecError) -> list[str]:
    """The mismatch lines of a SpecError message (each starts with '  - ')."""
    return [line[4:] for line in str(error).splitlines() if line.startswith("  - ")]


# ---------------------------------------------------------------------------------------------
# A small Builder/Interface protocol pair, shaped like the real linear protocols.


class ProjInterface(Protocol):
    def forward(self, hidden_states: Tensor, /) -> tuple[Tensor, Tensor | None]: ...

    def backward_dw(self) -> None: ...


class ProjBuilder(Protocol):
    def __call__(
        self, input_size: int, output_size: int, /, *, bias: bool, init_scale: float = 1.0
    ) -> ProjInterface: ...


class NormInterface(Protocol):
    def forward(self, x: Tensor, /) -> Tensor: ...


class NormBuilder(Protocol):
    def __call__(self, hidden_size: int, /, *, eps: float) -> NormInterface: ...


# ---------------------------------------------------------------------------------------------
# Conforming builders of every kind.


class GoodProj(nn.Module):
    def __init__(
        self, input_size: int, output_size: int, /, *, bias: bool, init_scale: float = 1.0
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(output_size, input_size) * init_scale)
        self.bias = nn.Parameter(torch.zeros(output_size)) if bias else None

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor | None]:
        return hidden_states @ self.weight.t(), self.bias

    def backward_dw(self) -> None:
        return None


class ProjFactory:
    """A class whose __new__ builds another type (GoodProj)."""

    def __new__(
        cls, input_size: int, output_size: int, /, *, bias: bool, init_scale: float = 1.0
    ) -> GoodProj:
        return GoodProj(input_size, output_size, bias=bias, init_scale=init_scale)


class ProjFactoryToInterface:
    """__new__ annotated with the Interface protocol itself."""

    def __new__(
        cls, input_size: int, output_size: int, /, *, bias: bool, init_scale: float = 1.0
    ) -> ProjInterface:
        return GoodProj(input_size, output_size, bias=bias, init_scale=init_scale)


class InheritedFactory(ProjFactory):
    """Inherits the __new__ that builds GoodProj."""


def make_proj(
    input_size: int, output_size: int, /, *, bias: bool, init_scale: float = 1.0
) -> GoodProj:
    return GoodProj(input_size, output_size, bias=bias, init_scale=init_scale)


class Fp8Proj(GoodProj):
    """Requires an option the protocol never passes: usable only with the option bound."""

    def __init__(
        self, input_size: int, output_size: int, /, *, bias: bool, fp8: bool,
        init_scale: float = 1.0,
    ) -> None:
        super().__init__(input_size, output_size, bias=bias, init_scale=init_scale)
        self.fp8 = fp8


class ProjMaker:
    """A callable instance."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(
        self, input_size: int, output_size: int, /, *, bias: bool, init_scale: float = 1.0
    ) -> GoodProj:
        return GoodProj(input_size, output_size, bias=bias, init_scale=init_scale * self.scale)


class UnhashableProjMaker(ProjMaker):
    """A callable instance that cannot be a cache key."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UnhashableProjMaker) and other.scale == self.scale

    __hash__ = None  # type: ignore[assignment]


def proj_by_name(input_size, output_size, bias, init_scale=1.0) -> GoodProj:  # type: ignore[no-untyped-def]
    """Positional-or-keyword everywhere: sizes by position, options by name."""
    return GoodProj(input_size, output_size, bias=bias, init_scale=init_scale)


def proj_renamed_positionals(a: int, b: int, /, *, bias: bool, init_scale: float = 1.0) -> GoodProj:
    return GoodProj(a, b, bias=bias, init_scale=init_scale)


def proj_kwargs(input_size: int, output_size: int, /, **options: Any) -> GoodProj:
    return GoodProj(input_size, output_size, bias=options["bias"])


def proj_var_args(*sizes: int, bias: bool, init_scale: float = 1.0) -> GoodProj:
    return GoodProj(sizes[0], sizes[1], bias=bias, init_scale=init_scale)


def proj_unannotated(input_size, output_size, /, *, bias, init_scale=1.0):  # type: ignore[no-untyped-def]
    return GoodProj(input_size, output_size, bias=bias, init_scale=init_scale)


# ---------------------------------------------------------------------------------------------
# Builders with mismatches.


def proj_extra_required(
    input_size: int, output_size: int, /, *, bias: bool, fp8: bool, init_scale: float = 1.0
) -> GoodProj:
    return GoodProj(input_size, output_size, bias=bias)


def proj_no_default(
    input_size: int, output_size: int, /, *, bias: bool, init_scale: float
) -> GoodProj:
    return GoodProj(input_size, output_size, bias=bias)


def proj_missing_keyword(input_size: int, output_size: int, /, *, init_scale: float = 1.0) -> GoodProj:
    return GoodProj(input_size, output_size, bias=False)


def proj_one_positional(input_size: int, /, *, bias: bool, init_scale: float = 1.0) -> GoodProj:
    return GoodProj(input_size, input_size, bias=bias)


def proj_keyword_twice(input_size: int, bias: bool, *, init_scale: float = 1.0) -> GoodProj:
    """The protocol's second size lands in 'bias', then 'bias' comes again by name."""
    return GoodProj(input_size, input_size, bias=bias)


def proj_size_also_keyword(input_size: int, output_size: int, bias: bool = False, *,
                           init_scale: float = 1.0) -> GoodProj:
    """'bias' is the third positional slot: the protocol passes only two, then bias by name."""
    return GoodProj(input_size, output_size, bias=bias)


class NoBackwardDw(nn.Module):
    def __init__(self, input_size: int, output_size: int, /, *, bias: bool,
                 init_scale: float = 1.0) -> None:
        super().__init__()

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor | None]:
        return hidden_states, None


class ForwardTakesTwo(GoodProj):
    def forward(self, hidden_states: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:  # type: ignore[override]
        return hidden_states, mask


class ForwardTakesNone(GoodProj):
    def forward(self) -> tuple[Tensor, Tensor | None]:  # type: ignore[override]
        return self.weight, None


class BackwardDwTakesArg(GoodProj):
    def backward_dw(self, chunk: int) -> None:  # type: ignore[override]
        return None


class ForwardReturnsTensor(GoodProj):
    def forward(self, hidden_states: Tensor) -> Tensor:  # type: ignore[override]
        return hidden_states


class ForwardUnannotated(GoodProj):
    def forward(self, hidden_states):  # type: ignore[no-untyped-def]
        return hidden_states


class BadFactory:
    """__new__ builds ForwardReturnsTensor: the built type, not BadFactory, is checked."""

    def __new__(cls, input_size: int, output_size: int, /, *, bias: bool,
                init_scale: float = 1.0) -> ForwardReturnsTensor:
        return ForwardReturnsTensor(input_size, output_size, bias=bias)


def make_tensor_proj(input_size: int, output_size: int, /, *, bias: bool,
                     init_scale: float = 1.0) -> ForwardReturnsTensor:
    return ForwardReturnsTensor(input_size, output_size, bias=bias)


class BadMaker:
    """A callable instance building a layer without backward_dw."""

    def __call__(self, input_size: int, output_size: int, /, *, bias: bool,
                 init_scale: float = 1.0) -> NoBackwardDw:
        return NoBackwardDw(input_size, output_size, bias=bias)


class EverythingWrong(nn.Module):
    """One positional, a required protocol default, an extra required keyword, wrong forward."""

    def __init__(self, input_size: int, /, *, init_scale: float, fp8: bool) -> None:
        super().__init__()

    def forward(self, hidden_states: Tensor, mask: Tensor) -> Tensor:
        return hidden_states


# ---------------------------------------------------------------------------------------------
# Builder kinds that conform.


@pytest.mark.parametrize(
    "builder",
    [
        pytest.param(GoodProj, id="class"),
        pytest.param(ProjFactory, id="class-new-builds-other-type"),
        pytest.param(ProjFactoryToInterface, id="class-new-returns-interface"),
        pytest.param(InheritedFactory, id="class-inherited-new"),
        pytest.param(make_proj, id="function"),
        pytest.param(functools.partial(Fp8Proj, fp8=True), id="partial"),
        pytest.param(functools.partial(functools.partial(Fp8Proj, fp8=True), init_scale=0.5),
                     id="nested-partial"),
        pytest.param(functools.partial(make_proj, init_scale=0.5), id="partial-of-function"),
        pytest.param(ProjMaker(2.0), id="callable-instance"),
        pytest.param(functools.partial(ProjMaker(2.0), init_scale=0.5), id="partial-of-instance"),
        pytest.param(UnhashableProjMaker(2.0), id="unhashable-callable-instance"),
    ],
)
def test_conforming_builder_kinds_pass(builder: object) -> None:
    check_builder(builder, ProjBuilder, slot="S.linear")
    check_builder(builder, ProjBuilder, slot="S.linear")  # cached or not, still passes


def test_conforming_builders_actually_build_the_interface() -> None:
    # Sanity: the builders the checker accepts can be called exactly as the protocol calls them.
    for builder in (GoodProj, ProjFactory, make_proj, functools.partial(Fp8Proj, fp8=True),
                    ProjMaker(1.0)):
        layer = builder(3, 4, bias=True)
        out, bias = layer.forward(torch.ones(2, 3))
        assert out.shape == (2, 4) and bias is not None and bias.shape == (4,)


@pytest.mark.parametrize(
    "builder",
    [
        pytest.param(proj_renamed_positionals, id="positional-only-by-position"),
        pytest.param(proj_by_name, id="keyword-by-name"),
        pytest.param(proj_kwargs, id="keywords-via-kwargs"),
        pytest.param(proj_var_args, id="positionals-via-args"),
        pytest.param(proj_unannotated, id="unannotated-return"),
        pytest.param(ForwardUnannotated, id="unannotated-forward-return"),
    ],
)
def test_accepted_parameter_shapes(builder: object) -> None:
    check_builder(builder, ProjBuilder, slot="S.linear")


# ---------------------------------------------------------------------------------------------
# Each mismatch kind.


@pytest.mark.parametrize(
    ("builder", "expected"),
    [
        pytest.param(proj_extra_required, ["requires parameter 'fp8' that the protocol never passes"],
                     id="extra-required"),
        pytest.param(Fp8Proj, ["requires parameter 'fp8' that the protocol never passes"],
                     id="extra-required-class"),
        pytest.param(proj_no_default, ["keyword parameter 'init_scale' is optional in the protocol"],
                     id="protocol-default-needs-default"),
        pytest.param(proj_missing_keyword, ["missing keyword parameter 'bias'"],
                     id="missing-keyword"),
        pytest.param(proj_one_positional,
                     ["takes 1 positional argument(s) but the protocol passes 'output_size' at position 1"],
                     id="too-few-positionals"),
        pytest.param(proj_keyword_twice,
                     ["parameter 'bias' is filled by position 1 and again by name"],
                     id="keyword-filled-twice"),
        pytest.param(NoBackwardDw, ["the built NoBackwardDw has no method 'backward_dw' required by ProjInterface"],
                     id="interface-method-missing"),
        pytest.param(ForwardTakesTwo,
                     ["ForwardTakesTwo.forward requires parameter 'mask' that the protocol never passes"],
                     id="interface-arity-too-many"),
        pytest.param(ForwardTakesNone,
                     ["ForwardTakesNone.forward takes 0 positional argument(s) but the protocol passes "
                      "'hidden_states' at position 0"],
                     id="interface-arity-too-few"),
        pytest.param(BackwardDwTakesArg,
                     ["BackwardDwTakesArg.backward_dw requires parameter 'chunk'"],
                     id="interface-arity-backward-dw"),
        pytest.param(ForwardReturnsTensor,
                     ["ForwardReturnsTensor.forward returns Tensor, the protocol expects tuple[Tensor, Tensor | None]"],
                     id="return-tensor-vs-tuple"),
        pytest.param(BadFactory,
                     ["ForwardReturnsTensor.forward returns Tensor, the protocol expects"],
                     id="class-new-builds-bad-type"),
        pytest.param(make_tensor_proj,
                     ["ForwardReturnsTensor.forward returns Tensor, the protocol expects"],
                     id="function-returns-bad-type"),
        pytest.param(BadMaker(), ["the built NoBackwardDw has no method 'backward_dw'"],
                     id="callable-instance-builds-bad-type"),
    ],
)
def test_mismatch_is_reported(builder: object, expected: list[str]) -> None:
    with pytest.raises(SpecError) as info:
        check_builder(builder, ProjBuilder, slot="S.linear")
    problems = _problems(info.value)
    for text in expected:
        assert any(text in problem for problem in problems), (text, problems)
    assert len(problems) == len(expected), problems


def test_keyword_filled_by_position_and_by_name() -> None:
    def positional_bias(input_size: int, output_size: int, bias: bool, /) -> GoodProj:
        return GoodProj(input_size, output_size, bias=bias)

    with pytest.raises(SpecError) as info:
        check_builder(positional_bias, ProjBuilder, slot="S.linear")
    assert any("missing keyword parameter 'bias'" in p for p in _problems(info.value))


def test_optional_third_positional_is_fine() -> None:
    # bias is the builder's third positional-or-keyword parameter; the protocol passes two
    # sizes by position, then bias by name: a legal call.
    check_builder(proj_size_also_keyword, ProjBuilder, slot="S.linear")


def test_bare_subclass_with_required_option_rejected_but_partial_accepted() -> None:
    with pytest.raises(SpecError, match="'fp8'"):
        check_builder(Fp8Proj, ProjBuilder, slot="S.linear")
    check_builder(functools.partial(Fp8Proj, fp8=False), ProjBuilder, slot="S.linear")


def test_partial_binding_the_wrong_keyword_still_fails() -> None:
    with pytest.raises(SpecError) as info:
        check_builder(functools.partial(Fp8Proj, bias=True), ProjBuilder, slot="S.linear")
    assert any("'fp8'" in p for p in _problems(info.value))


def test_different_protocol_rejects_linear() -> None:
    with pytest.raises(SpecError) as info:
        check_builder(GoodProj, NormBuilder, slot="S.norm")
    problems = _problems(info.value)
    assert any("missing keyword parameter 'eps'" in p for p in problems)
    assert any("requires parameter 'output_size'" in p for p in problems)
    assert any("requires parameter 'bias'" in p for p in problems)
    assert any("GoodProj.forward returns tuple" in p for p in problems)


# ---------------------------------------------------------------------------------------------
# Values that are not builders.


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("GoodProj", "is a value of type str, not a builder", id="string"),
        pytest.param(object(), "is a value of type object, not a builder", id="object"),
        pytest.param(42, "is a value of type int, not a builder", id="int"),
        pytest.param({"module": GoodProj, "params": {}}, "is a value of type dict, not a builder",
                     id="untyped-spec-dict"),
    ],
)
def test_non_callable_values_are_rejected(value: object, expected: str) -> None:
    with pytest.raises(SpecError) as info:
        check_builder(value, ProjBuilder, slot="S.linear")
    message = str(info.value)
    assert message.startswith("S.linear: ")
    assert repr(value) in message
    assert "ProjBuilder" in message
    assert _problems(info.value) == [p for p in _problems(info.value) if expected in p]
    assert len(_problems(info.value)) == 1


def test_module_instance_is_rejected() -> None:
    layer = GoodProj(2, 3, bias=False)
    with pytest.raises(SpecError) as info:
        check_builder(layer, ProjBuilder, slot="S.linear")
    (problem,) = _problems(info.value)
    assert "is a module instance" in problem
    assert "the class" in problem


def test_spec_error_is_a_type_error() -> None:
    assert issubclass(SpecError, TypeError)


def test_non_builder_protocol_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="ProjInterface is not a Builder protocol"):
        check_builder(GoodProj, ProjInterface, slot="S.linear")


# ---------------------------------------------------------------------------------------------
# The message.


def test_message_names_slot_builder_location_protocol_and_every_mismatch() -> None:
    with pytest.raises(SpecError) as info:
        check_builder(EverythingWrong, ProjBuilder, slot="LayerSubmodules.linear_proj")
    message = str(info.value)
    first = message.splitlines()[0]
    assert first.startswith("LayerSubmodules.linear_proj: ")
    assert "EverythingWrong" in first
    assert _location("class EverythingWrong(") in first
    assert first.endswith("does not satisfy ProjBuilder:")
    problems = _problems(info.value)
    expected = [
        "takes 1 positional argument(s) but the protocol passes 'output_size' at position 1",
        "missing keyword parameter 'bias'",
        "keyword parameter 'init_scale' is optional in the protocol but required by the builder",
        "requires parameter 'fp8' that the protocol never passes",
        "EverythingWrong.forward requires parameter 'mask'",
        "EverythingWrong.forward returns Tensor, the protocol expects tuple[Tensor, Tensor | None]",
        "the built EverythingWrong has no method 'backward_dw' required by ProjInterface",
    ]
    for text in expected:
        assert sum(text in p for p in problems) == 1, (text, problems)
    assert len(problems) == len(expected), problems


def test_message_for_function_points_at_def_line() -> None:
    with pytest.raises(SpecError) as info:
        check_builder(proj_extra_required, ProjBuilder, slot="S.fc2")
    first = str(info.value).splitlines()[0]
    assert first.startswith("S.fc2: ")
    assert f"{__name__}.proj_extra_required ({_location('def proj_extra_required(')})" in first


def test_message_for_partial_names_inner_builder_and_bound_keywords() -> None:
    with pytest.raises(SpecError) as info:
        check_builder(functools.partial(EverythingWrong, fp8=True), ProjBuilder, slot="S.x")
    first = str(info.value).splitlines()[0]
    assert "functools.partial(" in first
    assert _location("class EverythingWrong(") in first
    assert "fp8=..." in first
    # Binding fp8 removed exactly that mismatch.
    assert not any("'fp8'" in p for p in _problems(info.value))


def test_message_for_callable_instance_points_at_its_class() -> None:
    with pytest.raises(SpecError) as info:
        check_builder(BadMaker(), ProjBuilder, slot="S.x")
    first = str(info.value).splitlines()[0]
    assert "BadMaker" in first
    assert _location("class BadMaker:") in first


def test_message_without_slot() -> None:
    with pytest.raises(SpecError) as info:
        check_builder(proj_missing_keyword, ProjBuilder)
    assert str(info.value).startswith(f"{__name__}.proj_missing_keyword (")


def test_describe_builder() -> None:
    assert describe_builder(make_proj) == f"{__name__}.make_proj ({_location('def make_proj(')})"
    assert describe_builder(GoodProj) == f"{__name__}.GoodProj ({_location('class GoodProj(')})"
    described = describe_builder(functools.partial(Fp8Proj, 3, fp8=True))
    assert re.fullmatch(r"functools\.partial\(.*Fp8Proj \(.*\), 3, fp8=\.\.\.\)", described)


# ---------------------------------------------------------------------------------------------
# The cache.


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, type]]:
    """Fresh cache; records every (builder, protocol) pair the checker actually computes."""
    calls: list[tuple[object, type]] = []
    compute = check_module._compute_mismatches

    def counting(builder: object, protocol: type) -> list[str]:
        calls.append((builder, protocol))
        return compute(builder, protocol)

    monkeypatch.setattr(check_module, "_cache", {})
    monkeypatch.setattr(check_module, "_compute_mismatches", counting)
    return calls


def test_result_is_cached_per_builder_and_protocol(counted: list[tuple[object, type]]) -> None:
    for index in range(1000):
        check_builder(GoodProj, ProjBuilder, slot=f"Layer{index}Submodules.linear")
    assert len(counted) == 1
    check_builder(make_proj, ProjBuilder, slot="S.other")
    assert len(counted) == 2
    with pytest.raises(SpecError):
        check_builder(GoodProj, NormBuilder, slot="S.norm")  # same builder, other protocol
    assert len(counted) == 3


def test_failures_are_cached_and_still_raise(counted: list[tuple[object, type]]) -> None:
    for index in range(100):
        with pytest.raises(SpecError, match=f"^S{index}.x: "):
            check_builder(EverythingWrong, ProjBuilder, slot=f"S{index}.x")
    assert len(counted) == 1


def test_unhashable_builder_is_checked_every_time(counted: list[tuple[object, type]]) -> None:
    maker = UnhashableProjMaker(1.0)
    check_builder(maker, ProjBuilder, slot="S.x")
    check_builder(maker, ProjBuilder, slot="S.x")
    assert len(counted) == 2


# ---------------------------------------------------------------------------------------------
# The real linear kinds.


def _parallel_layers() -> Any:
    import protoformer.parallel as parallel

    if parallel.RowParallelLinear is None or parallel.ColumnParallelLinear is None:
        pytest.skip("protoformer.parallel.layers is still a placeholder")
    return parallel


def test_real_linears_fit_their_own_kind() -> None:
    parallel = _parallel_layers()
    check_builder(parallel.RowParallelLinear, parallel.RowParallelLinearBuilder, slot="S.row")
    check_builder(parallel.ColumnParallelLinear, parallel.ColumnParallelLinearBuilder,
                  slot="S.column")
    check_builder(parallel.Linear, parallel.LinearBuilder, slot="S.replicated")


@pytest.mark.parametrize(
    ("builder_name", "protocol_name", "expected"),
    [
        ("ColumnParallelLinear", "RowParallelLinearBuilder",
         ["missing keyword parameter 'input_is_parallel'", "requires parameter 'gather_output'"]),
        ("RowParallelLinear", "ColumnParallelLinearBuilder",
         ["missing keyword parameter 'gather_output'", "requires parameter 'input_is_parallel'"]),
        ("ColumnParallelLinear", "LinearBuilder", ["requires parameter 'gather_output'"]),
        ("RowParallelLinear", "LinearBuilder", ["requires parameter 'input_is_parallel'"]),
        ("Linear", "RowParallelLinearBuilder", ["missing keyword parameter 'input_is_parallel'"]),
        ("Linear", "ColumnParallelLinearBuilder", ["missing keyword parameter 'gather_output'"]),
    ],
)
def test_real_linear_kinds_do_not_pass_for_each_other(
    builder_name: str, protocol_name: str, expected: list[str]
) -> None:
    parallel = _parallel_layers()
    builder = getattr(parallel, builder_name)
    with pytest.raises(SpecError) as info:
        check_builder(builder, getattr(parallel, protocol_name), slot="S.linear")
    first = str(info.value).splitlines()[0]
    assert builder_name in first and protocol_name in first
    problems = _problems(info.value)
    for text in expected:
        assert any(text in p for p in problems), (text, problems)


def test_user_subclass_of_real_linear_with_extra_option() -> None:
    parallel = _parallel_layers()

    class Fp8Row(parallel.RowParallelLinear):  # type: ignore[misc,name-defined]
        def __init__(self, *args: Any, fp8: bool, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.fp8 = fp8

    with pytest.raises(SpecError, match="'fp8'"):
        check_builder(Fp8Row, parallel.RowParallelLinearBuilder, slot="S.row")
    check_builder(functools.partial(Fp8Row, fp8=True), parallel.RowParallelLinearBuilder,
                  slot="S.row")


def test_partial_binding_a_wrong_record_type_is_reported() -> None:
    import functools

    from protoformer.transformer.attention import SelfAttention
    from protoformer.transformer.interfaces import AttentionBuilder
    from protoformer.transformer.mlp import MLPSubmodules

    wrong = functools.partial(SelfAttention, submodules=MLPSubmodules.__new__(MLPSubmodules))
    with pytest.raises(SpecError) as info:
        check_builder(wrong, AttentionBuilder, slot="Layer.self_attention")
    message = str(info.value)
    assert "binds submodules= to a MLPSubmodules" in message
    assert "SelfAttentionSubmodules" in message


def test_fresh_partials_of_the_same_shape_share_one_check(
        counted: list[tuple[object, type]]) -> None:
    # Recipes build new partial objects on each call: the cache keys them by shape.
    from protoformer.backends import get_backend
    from protoformer.recipes import get_preset, gpt_layer_spec

    backend, config = get_backend("local"), get_preset("tiny").config()
    gpt_layer_spec(backend, config)
    first = len(counted)
    for _ in range(20):
        gpt_layer_spec(backend, config)
    assert len(counted) == first
    # A different bound keyword set is a different shape, checked on its own.
    wrong = functools.partial(GoodProj, unexpected=1)
    with pytest.raises(SpecError, match="binds keyword 'unexpected' that GoodProj does not accept"):
        check_builder(wrong, ProjBuilder, slot="S.linear")
    assert len(counted) == first + 1
