"""override/apply_overrides edit a spec by slot path; diff/spec_equal compare specs.

The hypothesis test throws random overrides (real slot paths and garbage, names of real
builders of every kind, names outside the allowlist, random JSON) at a real GPT layer spec:
each one either yields a valid, serializable spec or raises SpecError, and nothing outside
the allowlist is ever imported.
"""

import functools
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protoformer.parallel.layers
import protoformer.transformer.attention
import protoformer.transformer.core_attention
import protoformer.transformer.enums
import protoformer.transformer.layer
import protoformer.transformer.mla
import protoformer.transformer.mlp
import protoformer.transformer.norm
from protoformer.backends import get_backend
from protoformer.config import TransformerConfig
from protoformer.recipes.gpt import gpt_layer_spec
from protoformer.spec import (
    SpecDifference,
    SpecError,
    Submodules,
    apply_overrides,
    diff,
    from_dict,
    override,
    spec_equal,
    to_dict,
    validate_submodules,
)
from protoformer.spec.names import is_named_builder
from protoformer.transformer.attention import SelfAttention, SelfAttentionSubmodules
from protoformer.transformer.enums import AttnMaskType
from protoformer.transformer.layer import TransformerLayerSubmodules
from protoformer.transformer.norm import LayerNorm, RMSNorm
from tests.spec import spec_testkit as kit


def _gpt_spec() -> TransformerLayerSubmodules:
    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                               normalization="RMSNorm", qk_layernorm=True)
    return gpt_layer_spec(get_backend("local"), config)


def _attention(spec: TransformerLayerSubmodules) -> SelfAttentionSubmodules:
    attention = spec.self_attention
    assert isinstance(attention, functools.partial)
    inner = attention.keywords["submodules"]
    assert isinstance(inner, SelfAttentionSubmodules)
    return inner


# ---------------------------------------------------------------------------------------------
# override


@pytest.mark.parametrize("path", ["self_attention.submodules.q_layernorm",
                                  "self_attention.q_layernorm"])
def test_override_sets_a_nested_slot_by_canonical_or_short_path(path: str) -> None:
    spec = _gpt_spec()
    new = override(spec, f"{path}=protoformer.transformer.norm:LayerNorm")
    assert _attention(new).q_layernorm is LayerNorm
    assert _attention(spec).q_layernorm is not LayerNorm  # the input is unchanged
    assert diff(spec, new) == [SpecDifference(
        "self_attention.submodules.q_layernorm", describe(_attention(spec).q_layernorm),
        "protoformer.transformer.norm:LayerNorm")]


def describe(value: object) -> str:
    from protoformer.spec.overrides import describe_value

    return describe_value(value)


def test_override_never_mutates_its_input() -> None:
    spec = _gpt_spec()
    before = to_dict(spec)
    for assignment in ["self_attention.submodules.q_layernorm=null", "input_layernorm.eps=0.5",
                       "mlp.submodules.activation=protoformer.transformer.mlp:Activation",
                       "self_attention.attn_mask_type=\"causal\""]:
        override(spec, assignment)
    assert to_dict(spec) == before


@pytest.mark.parametrize("value", ["null", "None", " null "])
def test_null_clears_an_optional_slot(value: str) -> None:
    new = override(_gpt_spec(), f"self_attention.k_layernorm={value}")
    assert _attention(new).k_layernorm is None


def test_null_in_a_required_slot_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="core_attention: is None, but this slot is required"):
        override(_gpt_spec(), "self_attention.core_attention=null")


def test_a_miswired_builder_is_a_spec_error_naming_the_slot() -> None:
    with pytest.raises(SpecError) as error:
        override(_gpt_spec(), "mlp.linear_fc1=protoformer.parallel.layers:RowParallelLinear")
    message = str(error.value)
    assert message.startswith("override 'mlp.linear_fc1=")
    assert "MLPSubmodules.linear_fc1" in message and "gather_output" in message


def test_a_keyword_of_a_plain_class_wraps_it_in_a_partial() -> None:
    new = override(_gpt_spec(), "input_layernorm.eps=1e-6")
    norm = new.input_layernorm
    assert isinstance(norm, functools.partial)
    assert norm.func is RMSNorm and norm.keywords == {"eps": 1e-6}


def test_keywords_take_json_literals_enum_names_and_builder_names() -> None:
    spec = override(_gpt_spec(), 'self_attention.attn_mask_type='
                                 '{"__enum__": "protoformer.transformer.enums:AttnMaskType.causal"}')
    attention = spec.self_attention
    assert isinstance(attention, functools.partial)
    assert attention.keywords["attn_mask_type"] is AttnMaskType.causal
    # An enum-valued keyword takes a bare member name, quoted or not.
    for value in ("no_mask", '"no_mask"'):
        changed = override(spec, f"self_attention.attn_mask_type={value}")
        assert changed.self_attention.keywords["attn_mask_type"] is AttnMaskType.no_mask  # type: ignore[union-attr]
    with pytest.raises(SpecError, match="has no member 'sideways'"):
        override(spec, "self_attention.attn_mask_type=sideways")
    # A builder name as a keyword value.
    local = kit.InnerSubmodules(norm=functools.partial(kit.Norm, eps=1.0), proj=kit.Proj)
    helper = override(local, "norm.helper=tests.spec.spec_testkit:make_norm", allow=kit.ALLOW)
    assert helper.norm.keywords["helper"] is kit.make_norm  # type: ignore[union-attr]


def test_dtype_keywords_take_a_bare_dtype_name() -> None:
    spec = kit.InnerSubmodules(norm=functools.partial(kit.Norm, eps=1.0, dtype=torch.float32),
                               proj=kit.Proj)
    new = override(spec, "norm.dtype=bfloat16", allow=kit.ALLOW)
    assert new.norm.keywords["dtype"] is torch.bfloat16  # type: ignore[union-attr]
    with pytest.raises(SpecError, match="not a torch dtype"):
        override(spec, "norm.dtype=float33", allow=kit.ALLOW)


def test_a_slot_takes_a_json_partial_or_record() -> None:
    value = json.dumps({"__partial__": "protoformer.transformer.norm:LayerNorm",
                        "kwargs": {"eps": 0.001}})
    new = override(_gpt_spec(), f"pre_mlp_layernorm={value}")
    norm = new.pre_mlp_layernorm
    assert isinstance(norm, functools.partial) and norm.func is LayerNorm


def test_plain_data_fields_take_json() -> None:
    spec = kit.OuterSubmodules(block=functools.partial(kit.Block, submodules=kit.small_spec()),
                               inner=kit.small_spec())
    assert override(spec, 'label="new"', allow=kit.ALLOW).label == "new"
    with pytest.raises(SpecError, match="not a JSON literal"):
        override(spec, "label=new", allow=kit.ALLOW)


def test_overrides_respect_the_allowlist() -> None:
    with pytest.raises(SpecError, match="'os:system' is refused"):
        override(_gpt_spec(), "input_layernorm=os:system")
    local = kit.small_spec()
    with pytest.raises(SpecError, match="is refused"):
        override(local, "norm=tests.spec.spec_testkit:make_norm")
    assert override(local, "norm=tests.spec.spec_testkit:make_norm",
                    allow=kit.ALLOW).norm is kit.make_norm


@pytest.mark.parametrize("assignment, needle", [
    ("input_layernorm", "expected PATH=VALUE"),
    ("=protoformer.transformer.norm:LayerNorm", "invalid segment ''"),
    ("a..b=1", "invalid segment ''"),
    ("input layernorm=null", "invalid segment 'input layernorm'"),
    ("input_layernorm.=null", "invalid segment ''"),
    ("nonexistent=null", "has no slot 'nonexistent'"),
    ("self_attention.nope.deeper=1", "has no keyword 'nope'"),
    ("input_layernorm.eps.deeper=1", "has no keyword 'eps'"),
    ("cross_attention.eps=1", "set the slot to a builder first"),
    ("input_layernorm=LayerNorm", "takes a builder 'package.module:Name'"),
    ("input_layernorm={not json", "is not valid JSON"),
    ("input_layernorm.eps=1e-6x", "not a JSON literal"),
    ("input_layernorm.eps=NaN", "not finite"),
    ("input_layernorm=protoformer.transformer.norm:_check_norm_args", "private"),
    ("mlp.submodules=null", "holds a MLPSubmodules record"),
    ("mlp.submodules=3", "holds a MLPSubmodules record"),
    ('mlp.submodules={"__submodules__": "protoformer.transformer.attention:SelfAttentionSubmodules"'
     ', "fields": {}}', "missing required field(s)"),
])
def test_bad_overrides_raise_spec_error_with_the_text(assignment: str, needle: str) -> None:
    with pytest.raises(SpecError) as error:
        override(_gpt_spec(), assignment)
    assert needle in str(error.value)
    assert repr(assignment) in str(error.value)


def test_override_checks_its_arguments() -> None:
    with pytest.raises(SpecError, match="single string"):
        override(_gpt_spec(), "input_layernorm=null", allow="protoformer.")
    with pytest.raises(SpecError, match="not a dotted module path"):
        override(_gpt_spec(), "input_layernorm.eps=1", allow=("",))
    with pytest.raises(SpecError, match="expects a Submodules record"):
        override(RMSNorm, "eps=1")  # type: ignore[type-var]
    with pytest.raises(SpecError, match="'PATH=VALUE' string"):
        override(_gpt_spec(), 3)  # type: ignore[arg-type]


def test_apply_overrides_applies_in_order() -> None:
    spec = _gpt_spec()
    new = apply_overrides(spec, ["input_layernorm=protoformer.transformer.norm:LayerNorm",
                                 "input_layernorm.eps=0.5"])
    norm = new.input_layernorm
    assert isinstance(norm, functools.partial) and norm.func is LayerNorm
    assert apply_overrides(spec, []) is spec
    with pytest.raises(SpecError, match="single string"):
        apply_overrides(spec, "input_layernorm=null")


# ---------------------------------------------------------------------------------------------
# diff and spec_equal


def test_diff_of_equal_specs_is_empty_and_spec_equal_holds() -> None:
    a, b = _gpt_spec(), _gpt_spec()
    assert a is not b and a != b  # partials compare by identity...
    assert diff(a, b) == [] and spec_equal(a, b)  # ...so spec_equal compares their contents


def test_diff_reports_every_changed_slot_and_keyword() -> None:
    spec = _gpt_spec()
    new = apply_overrides(spec, [
        "self_attention.submodules.k_layernorm=null",
        "mlp.submodules.activation=protoformer.transformer.mlp:Activation",  # unchanged
        "self_attention.layer_number=3",
        "pre_mlp_layernorm=protoformer.transformer.norm:LayerNorm",
    ])
    assert [d.path for d in diff(spec, new)] == [
        "self_attention.submodules.k_layernorm",
        "self_attention.layer_number",
        "pre_mlp_layernorm",
    ]
    by_path = {d.path: d for d in diff(spec, new)}
    assert by_path["self_attention.layer_number"].old == "(not set)"
    assert by_path["self_attention.layer_number"].new == "3"
    assert str(by_path["pre_mlp_layernorm"]) == ("pre_mlp_layernorm: "
        "protoformer.transformer.norm:RMSNorm -> protoformer.transformer.norm:LayerNorm")
    assert not spec_equal(spec, new)


def test_diff_of_different_builders_reports_the_whole_slot() -> None:
    a = kit.InnerSubmodules(norm=functools.partial(kit.Norm, eps=1.0), proj=kit.Proj)
    b = kit.InnerSubmodules(norm=functools.partial(kit.OtherNorm, eps=1.0), proj=kit.Proj)
    (difference,) = diff(a, b)
    assert difference.path == "norm"
    assert "Norm" in difference.old and "OtherNorm" in difference.new


def test_diff_of_different_record_types_is_one_root_difference() -> None:
    outer = kit.OuterSubmodules(block=functools.partial(kit.Block, submodules=kit.small_spec()),
                                inner=kit.small_spec())
    (difference,) = diff(kit.small_spec(), outer)
    assert difference.path == "(root)"


def test_spec_equal_is_type_exact() -> None:
    a = kit.InnerSubmodules(norm=functools.partial(kit.Norm, eps=1), proj=kit.Proj)
    b = kit.InnerSubmodules(norm=functools.partial(kit.Norm, eps=1.0), proj=kit.Proj)
    c = kit.InnerSubmodules(norm=functools.partial(kit.Norm, eps=True), proj=kit.Proj)
    assert not spec_equal(a, b) and not spec_equal(a, c)
    assert [d.path for d in diff(a, b)] == ["norm.eps"]


# ---------------------------------------------------------------------------------------------
# Random overrides.

_MODULES: list[ModuleType] = [
    protoformer.parallel.layers, protoformer.transformer.attention,
    protoformer.transformer.core_attention, protoformer.transformer.enums,
    protoformer.transformer.layer, protoformer.transformer.mla, protoformer.transformer.mlp,
    protoformer.transformer.norm,
]


def _builder_pool() -> list[str]:
    """Every public class and function protoformer's layer modules define, by name."""
    pool: list[str] = []
    for module in _MODULES:
        for name in getattr(module, "__all__", dir(module)):
            obj = getattr(module, name, None)
            if is_named_builder(obj) and getattr(obj, "__module__", None) == module.__name__:
                pool.append(f"{module.__name__}:{name}")
    return pool


BUILDERS = _builder_pool()
REFUSED_NAMES = ["os:system", "subprocess:run", "builtins:eval", "notallowed_pkg_xyz:thing",
                 "protoformerx.evil:thing", "protoformer.transformer.norm:_check_norm_args",
                 "protoformer.transformer.norm:LayerNorm.__init__", "protoformer:spec.SpecError",
                 "protoformer.transformer:norm", "protoformer.no_such_module_xyz:Thing"]
ODD_VALUES = ["", ":", "::", "null", "None", "{", "{}", "[]", "true", "1e400", "NaN", '"text"',
              '{"__partial__": "os:system"}', '{"__ref__": "notallowed_pkg_xyz:f"}',
              '{"__partial__": "protoformer.transformer.norm:RMSNorm", "kwargs": {"eps": 1e-5}}',
              '{"__enum__": "protoformer.transformer.enums:AttnMaskType.causal"}',
              '{"__dtype__": "bfloat16"}', '{"__tuple__": [1, 2]}', '{"__null__": true}',
              "causal", "no_mask", "bfloat16"]


def _real_paths(value: object, path: str = "") -> Iterator[str]:
    """The canonical and short paths of every slot and keyword in a spec."""
    if isinstance(value, Submodules):
        for name in value.__dataclass_fields__:  # type: ignore[attr-defined]
            sub = f"{path}.{name}" if path else name
            yield sub
            yield from _real_paths(getattr(value, name), sub)
    elif isinstance(value, functools.partial):
        for key, item in value.keywords.items():
            yield f"{path}.{key}"
            if key == "submodules":
                yield from _real_paths(item, path)  # the short form
            yield from _real_paths(item, f"{path}.{key}")
    if path and (is_named_builder(value) or isinstance(value, functools.partial)):
        yield f"{path}.eps"  # a new keyword


SPEC = _gpt_spec()
PATHS = sorted(set(_real_paths(SPEC)))
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
PATH_TEXT = st.sampled_from(PATHS) | st.sampled_from(
    ["", ".", "a..b", "self_attention.nope", "__class__", "input_layernorm.eps.deep",
     "mlp.submodules.__dict__", "1abc", "self_attention.submodules.__init__"]) | st.text(max_size=12)
VALUE_TEXT = (st.sampled_from(BUILDERS) | st.sampled_from(REFUSED_NAMES)
              | st.sampled_from(ODD_VALUES) | JSON.map(json.dumps) | st.text(max_size=12))
# Half the overrides are plausible (a real path; a builder name or a JSON value) so that many
# succeed and the resulting specs get checked; the rest are wild.
PLAUSIBLE = st.tuples(st.sampled_from(PATHS),
                      st.sampled_from(BUILDERS) | JSON.map(json.dumps) | st.just("null"))
OVERRIDE = PLAUSIBLE | st.tuples(PATH_TEXT, VALUE_TEXT)


@contextmanager
def _watch_imports() -> Iterator[list[str]]:
    asked: list[str] = []

    class Spy:
        def find_spec(self, name: str, path: object = None, target: object = None) -> None:
            asked.append(name)

    spy = Spy()
    sys.meta_path.insert(0, spy)
    try:
        yield asked
    finally:
        sys.meta_path.remove(spy)


def test_the_builder_pool_covers_every_layer_kind() -> None:
    names = {b.rsplit(":", 1)[1] for b in BUILDERS}
    assert {"LayerNorm", "RMSNorm", "ColumnParallelLinear", "RowParallelLinear", "SelfAttention",
            "MLP", "SelfAttentionSubmodules", "AttnMaskType"} <= names
    assert "self_attention.submodules.core_attention" in PATHS
    assert "self_attention.core_attention" in PATHS


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides=st.lists(OVERRIDE, min_size=1, max_size=3))
def test_random_overrides_give_a_valid_spec_or_spec_error(overrides: list[tuple[str, str]]) -> None:
    before = to_dict(SPEC)
    modules_before = set(sys.modules)
    with _watch_imports() as asked:
        for path, value in overrides:
            try:
                new = override(SPEC, f"{path}={value}")
            except SpecError:
                continue
            assert type(new) is TransformerLayerSubmodules
            validate_submodules(new)
            data = to_dict(new)
            assert spec_equal(from_dict(data), new)
            assert to_dict(from_dict(json.loads(json.dumps(data)))) == data
    assert to_dict(SPEC) == before
    assert all(name == "protoformer" or name.startswith("protoformer.") for name in asked), asked
    new_modules = set(sys.modules) - modules_before
    assert all(m.startswith("protoformer.") for m in new_modules), new_modules


def test_random_override_pool_imports_are_warm() -> None:
    # Every pooled builder resolves; their modules are already imported, so the property test's
    # "no new module" check is about the overrides alone.
    for name in BUILDERS:
        module = name.split(":")[0]
        assert module in sys.modules
    assert SelfAttention is protoformer.transformer.attention.SelfAttention
