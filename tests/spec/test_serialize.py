"""Specs as data: to_dict/from_dict round trips, spec files, and the import allowlist.

Local builders live in `tests.spec.spec_testkit` (importable by name); the real recipes and presets are
round-tripped too. The allowlist tests watch `sys.meta_path` to prove that a refused name
never reaches the import system.
"""

import functools
import importlib
import importlib.util
import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protoformer.config import MLATransformerConfig, TransformerConfig
from protoformer.spec import (
    SpecError,
    dumps_spec,
    from_dict,
    load_spec,
    loads_spec,
    save_spec,
    spec_equal,
    to_dict,
)
from protoformer.spec.names import resolve_reference
from protoformer.transformer.enums import AttnMaskType
from tests.spec import spec_testkit as kit

FIXTURES = Path(__file__).parent / "fixtures"
HAS_YAML = importlib.util.find_spec("yaml") is not None
FORMATS = ["json", "toml", pytest.param("yaml", marks=pytest.mark.skipif(
    not HAS_YAML, reason="PyYAML is not installed"))]


class ImportSpy:
    """A meta-path finder that records every module name the import system is asked for."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        self.asked.append(name)


@contextmanager
def spy_imports() -> Iterator[ImportSpy]:
    spy = ImportSpy()
    sys.meta_path.insert(0, spy)
    try:
        yield spy
    finally:
        sys.meta_path.remove(spy)


def _assert_same_builders(a: object, b: object) -> None:
    """Structural equality with the very same classes/functions (spec_equal, spelled out)."""
    assert spec_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Format and round trips.


def test_to_dict_writes_the_documented_format() -> None:
    spec = kit.InnerSubmodules(norm=functools.partial(kit.Norm, eps=1e-5), proj=kit.Proj)
    assert to_dict(spec) == {
        "__submodules__": "tests.spec.spec_testkit:InnerSubmodules",
        "fields": {
            "norm": {"__partial__": "tests.spec.spec_testkit:Norm", "args": [], "kwargs": {"eps": 1e-5}},
            "proj": "tests.spec.spec_testkit:Proj",
            "extra_norm": None,
        },
    }


def test_round_trip_restores_the_very_same_builders_and_values() -> None:
    spec = kit.full_spec()
    data = to_dict(spec)
    back = from_dict(data, allow=kit.ALLOW)
    assert to_dict(back) == data
    assert spec_equal(back, spec)
    assert isinstance(back, kit.OuterSubmodules)
    block = back.block
    assert isinstance(block, functools.partial) and block.func is kit.Block
    inner = block.keywords["submodules"]
    assert isinstance(inner, kit.InnerSubmodules)
    norm = inner.norm
    assert isinstance(norm, functools.partial) and norm.func is kit.Norm
    assert norm.keywords["color"] is kit.Color.blue
    assert norm.keywords["dtype"] is torch.bfloat16
    assert norm.keywords["shape"] == (1, 2) and type(norm.keywords["shape"]) is tuple
    assert norm.keywords["helper"] is kit.make_norm
    assert back.inner.norm is kit.Namespace.NestedNorm
    assert back.label == spec.label


def test_round_trip_survives_json_text() -> None:
    spec = kit.full_spec()
    text = json.dumps(to_dict(spec))
    assert spec_equal(from_dict(json.loads(text), allow=kit.ALLOW), spec)


@pytest.mark.parametrize("fmt", FORMATS)
def test_spec_files_round_trip(tmp_path: Path, fmt: str) -> None:
    spec = kit.full_spec()
    path = save_spec(spec, tmp_path / f"spec.{fmt}")
    back = load_spec(path, allow=kit.ALLOW)
    assert spec_equal(back, spec)
    assert to_dict(back) == to_dict(spec)


def test_toml_writer_escapes_every_awkward_string() -> None:
    for label in ['"', "\\", "\n\r\t\b\f", "\x00\x1f\x7f", "é∑😀", "'''", 'a = "b"', "[x]"]:
        spec = kit.OuterSubmodules(block=functools.partial(kit.Block, submodules=kit.small_spec()),
                                   inner=kit.small_spec(), label=label)
        assert loads_spec(dumps_spec(spec, "toml"), "toml", allow=kit.ALLOW).label == label


def test_toml_refuses_integers_beyond_64_bits() -> None:
    spec = kit.InnerSubmodules(norm=functools.partial(kit.Norm, eps=1.0, names=[2**64]),
                               proj=kit.Proj)
    assert from_dict(json.loads(dumps_spec(spec, "json")), allow=kit.ALLOW) is not None
    with pytest.raises(SpecError, match="64-bit"):
        dumps_spec(spec, "toml")


def test_omitted_fields_with_defaults_take_their_default() -> None:
    data = {"__submodules__": "tests.spec.spec_testkit:InnerSubmodules",
            "fields": {"norm": "tests.spec.spec_testkit:Norm", "proj": "tests.spec.spec_testkit:Proj"}}
    back = from_dict(data, allow=kit.ALLOW)
    assert isinstance(back, kit.InnerSubmodules) and back.extra_norm is None


def test_null_is_also_spelled_as_the_toml_tag() -> None:
    data = {"__submodules__": "tests.spec.spec_testkit:InnerSubmodules",
            "fields": {"norm": "tests.spec.spec_testkit:Norm", "proj": "tests.spec.spec_testkit:Proj",
                       "extra_norm": {"__null__": True}}}
    assert from_dict(data, allow=kit.ALLOW).extra_norm is None  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# Real recipes and presets.


def _gpt_configs() -> list[TransformerConfig]:
    base = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4}
    return [TransformerConfig(**base, normalization="LayerNorm"),  # type: ignore[arg-type]
            TransformerConfig(**base, normalization="RMSNorm", qk_layernorm=True,  # type: ignore[arg-type]
                              gated_linear_unit=True, add_bias_linear=False)]


def _round_trip_all_ways(spec: object, tmp_path: Path) -> None:
    data = to_dict(spec)  # type: ignore[arg-type]
    assert to_dict(from_dict(data)) == data
    assert spec_equal(from_dict(data), spec)
    for fmt in ("json", "toml", *(("yaml",) if HAS_YAML else ())):
        path = save_spec(spec, tmp_path / f"layer.{fmt}")  # type: ignore[arg-type]
        assert spec_equal(load_spec(path), spec), fmt


@pytest.mark.parametrize("config", _gpt_configs(), ids=["layernorm", "rmsnorm-qk"])
def test_gpt_layer_spec_round_trips_with_the_default_allowlist(config: TransformerConfig,
                                                                 tmp_path: Path) -> None:
    from protoformer.backends import get_backend
    from protoformer.recipes.gpt import gpt_layer_spec

    _round_trip_all_ways(gpt_layer_spec(get_backend("local"), config), tmp_path)


def test_mla_layer_spec_round_trips_with_the_default_allowlist(tmp_path: Path) -> None:
    from protoformer.backends import get_backend
    from protoformer.recipes.mla import mla_layer_spec

    for q_lora_rank in (None, 32):
        config = MLATransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                                      q_lora_rank=q_lora_rank, kv_lora_rank=16,
                                      qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16)
        _round_trip_all_ways(mla_layer_spec(get_backend("local"), config), tmp_path)


@pytest.mark.parametrize("config", _gpt_configs(), ids=["layernorm", "rmsnorm-qk"])
def test_t5_layer_specs_round_trip_with_the_default_allowlist(config: TransformerConfig,
                                                               tmp_path: Path) -> None:
    from protoformer.backends import get_backend
    from protoformer.recipes.t5 import t5_decoder_layer_spec, t5_encoder_layer_spec

    for recipe in (t5_encoder_layer_spec, t5_decoder_layer_spec):
        _round_trip_all_ways(recipe(get_backend("local"), config), tmp_path)


def test_every_preset_layer_spec_round_trips(tmp_path: Path) -> None:
    presets = pytest.importorskip("protoformer.recipes.presets",
                                  reason="presets not importable yet (models still landing)")
    from protoformer.backends import get_backend

    names = presets.list_presets()
    assert names
    for name in names:
        preset = presets.get_preset(name)
        _round_trip_all_ways(preset.layer_spec(get_backend("local"), preset.config()), tmp_path)


def test_hand_written_fixture_files_load() -> None:
    from protoformer.parallel.layers import ColumnParallelLinear, RowParallelLinear
    from protoformer.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from protoformer.transformer.layer import TransformerLayerSubmodules
    from protoformer.transformer.norm import LayerNorm, RMSNorm

    json_spec = load_spec(FIXTURES / "gpt_layer.json")
    toml_spec = load_spec(FIXTURES / "gpt_layer.toml")
    assert spec_equal(json_spec, toml_spec)
    assert isinstance(json_spec, TransformerLayerSubmodules)
    assert json_spec.input_layernorm is RMSNorm
    attention = json_spec.self_attention
    assert isinstance(attention, functools.partial) and attention.func is SelfAttention
    assert attention.keywords["attn_mask_type"] is AttnMaskType.causal
    inner = attention.keywords["submodules"]
    assert isinstance(inner, SelfAttentionSubmodules)
    assert inner.linear_qkv is ColumnParallelLinear and inner.linear_proj is RowParallelLinear
    assert isinstance(inner.q_layernorm, functools.partial)
    assert inner.q_layernorm.func is LayerNorm and inner.q_layernorm.keywords == {"eps": 1e-6}
    assert inner.k_layernorm is None


@pytest.mark.parametrize("name, needle", [
    ("evil_os_system.json", "'os:system' is refused"),
    ("evil_outside.toml", "'notallowed_pkg_xyz:Thing' is refused"),
    ("miswired.json", "linear_proj"),
])
def test_bad_fixture_files_are_refused_with_the_file_name(name: str, needle: str) -> None:
    with spy_imports() as spy, pytest.raises(SpecError) as error:
        load_spec(FIXTURES / name)
    assert needle in str(error.value) and name in str(error.value)
    assert not any(n.split(".")[0] in ("os", "notallowed_pkg_xyz") for n in spy.asked)


# ---------------------------------------------------------------------------------------------
# Values that cannot be written.


class _Unnamed:
    pass


def _local_class() -> type:
    class Local(kit.Norm):
        pass

    return Local


class _PartialSubclass(functools.partial):  # type: ignore[type-arg]
    pass


def _tagged_partial() -> object:
    value = functools.partial(kit.Norm, eps=1.0)
    value.note = "extra"  # type: ignore[attr-defined]
    return value


@pytest.mark.parametrize("norm, needle", [
    (lambda hidden_size, *, eps: kit.Norm(hidden_size, eps=eps), "lambda"),
    (_local_class(), "inside a function"),
    (kit.Norm(4, eps=1.0).forward, "cannot be written"),
    (functools.partial(kit.Norm, eps=1.0, helper=_Unnamed()), "cannot be written"),
    (functools.partial(kit.Norm, eps=math.nan), "not finite"),
    (functools.partial(kit.Norm, eps=1.0, options={1: 2}), "dict key 1"),
    (functools.partial(kit.Norm, eps=1.0, options={"__x": 2}), "reserved"),
    (functools.partial(kit.Norm, eps=1.0, helper={1, 2}), "cannot be written"),
    (kit._private_norm, "private"),
    (_PartialSubclass(kit.Norm, eps=1.0), "plain functools.partial"),
    (_tagged_partial(), "extra attributes"),
])
def test_unwritable_values_raise_naming_the_slot(norm: object, needle: str) -> None:
    spec = kit.InnerSubmodules(norm=kit.Norm, proj=kit.Proj)
    spec.norm = norm  # type: ignore[assignment]  # bypass validation: to_dict must still refuse
    outer = kit.OuterSubmodules(block=functools.partial(kit.Block, submodules=spec),
                                inner=kit.small_spec())
    with pytest.raises(SpecError) as error:
        to_dict(outer)
    message = str(error.value)
    assert needle in message
    assert message.startswith("block.submodules.norm")


def test_to_dict_refuses_a_non_record() -> None:
    with pytest.raises(SpecError, match="expects a Submodules record"):
        to_dict(kit.Norm)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Malformed data.

_GOOD_INNER = {"norm": "tests.spec.spec_testkit:Norm", "proj": "tests.spec.spec_testkit:Proj"}


def _inner(**fields: object) -> dict[str, object]:
    return {"__submodules__": "tests.spec.spec_testkit:InnerSubmodules", "fields": {**_GOOD_INNER, **fields}}


def _norm_partial(**kwargs: object) -> dict[str, object]:
    return {"__partial__": "tests.spec.spec_testkit:Norm", "args": [], "kwargs": {"eps": 1.0, **kwargs}}


@pytest.mark.parametrize("data, needle", [
    ([], "spec root: expected a record"),
    ({"fields": {}}, "needs '__submodules__'"),
    ({"__submodules__": "tests.spec.spec_testkit:InnerSubmodules"}, "missing key(s) ['fields']"),
    ({**_inner(), "extra": 1}, "unknown key(s) ['extra']"),
    ({"__submodules__": "tests.spec.spec_testkit:InnerSubmodules", "fields": []}, "fields: expected"),
    ({"__submodules__": 3, "fields": {}}, "expected a name"),
    ({"__submodules__": "tests.spec.spec_testkit:Norm", "fields": {}}, "not a Submodules record class"),
    (_inner(bogus="tests.spec.spec_testkit:Norm"), "has no field(s) ['bogus']"),
    ({"__submodules__": "tests.spec.spec_testkit:InnerSubmodules", "fields": {"norm": "tests.spec.spec_testkit:Norm"}},
     "missing required field(s) ['proj']"),
    (_inner(norm=3), "norm: a slot takes"),
    (_inner(norm=["tests.spec.spec_testkit:Norm"]), "norm: a slot takes"),
    (_inner(norm={"__tuple__": []}), "norm: a slot takes"),
    (_inner(norm={"__partial__": "tests.spec.spec_testkit:Norm", "args": {}, "kwargs": {}}), "'args' to be"),
    (_inner(norm={"__partial__": "tests.spec.spec_testkit:Norm", "args": [], "kwargs": []}), "'kwargs' to be"),
    (_inner(norm={"__partial__": "tests.spec.spec_testkit:Norm", "kw": {}}), "unknown key(s) ['kw']"),
    (_inner(norm={"__partial__": ["tests.spec.spec_testkit:Norm"]}), "expected a name"),
    (_inner(norm={"__partial__": "tests.spec.spec_testkit:Norm", "kwargs": {"not-id": 1}}), "not an identifier"),
    (_inner(norm={"__partial__": "tests.spec.spec_testkit:Norm", "__ref__": "x"}), "several tags"),
    (_inner(norm={"__bogus__": 1}), "unknown tag(s) ['__bogus__']"),
    (_inner(norm=_norm_partial(color={"__enum__": "tests.spec.spec_testkit:Color.green"})), "no member 'green'"),
    (_inner(norm=_norm_partial(color={"__enum__": "tests.spec.spec_testkit:Color"})), "package.module:Class.member"),
    (_inner(norm=_norm_partial(color={"__enum__": "tests.spec.spec_testkit:Norm.red"})), "not an Enum class"),
    (_inner(norm=_norm_partial(color={"__enum__": "tests.spec.spec_testkit:Color.blue", "x": 1})), "unknown key(s) ['x']"),
    (_inner(norm=_norm_partial(dtype={"__dtype__": "float33"})), "not a torch dtype"),
    (_inner(norm=_norm_partial(dtype={"__dtype__": "Tensor"})), "not a torch dtype"),
    (_inner(norm=_norm_partial(dtype={"__dtype__": 3})), "not a torch dtype"),
    (_inner(norm=_norm_partial(shape={"__tuple__": 3})), "'__tuple__' to hold a list"),
    (_inner(norm=_norm_partial(helper={"__null__": False})), "write null as"),
    (_inner(norm=_norm_partial(helper={"__ref__": "tests.spec.spec_testkit:SOME_CONSTANT"})), "not a class or function"),
    (_inner(norm=_norm_partial(eps=math.inf)), "not finite"),
    (_inner(norm=_norm_partial(options={1: 2})), "key 1 is not a string"),
    (_inner(norm=_norm_partial(options={"a": {1, 2}})), "is not a JSON value"),
    (_inner(norm="tests.spec.spec_testkit:SOME_CONSTANT"), "not a class or function"),
    (_inner(norm="tests.spec.spec_testkit:Missing"), "has no attribute 'Missing'"),
    (_inner(norm="tests.spec_nope:Norm"), "outside the allowed"),
    (_inner(norm="protoformer.no_such_module_xyz:Norm"), "cannot import"),
    (_inner(norm="protoformer.transformer:norm"), "names a module"),
    (_inner(norm="protoformer:spec.SpecError"), "not a class"),
    (_inner(norm="tests.spec.spec_testkit:Proj"), "InnerSubmodules.norm"),
    (_inner(extra_norm={"__partial__": "tests.spec.spec_testkit:Norm", "kwargs": {"bogus": 1}}),
     "InnerSubmodules.extra_norm"),
])
def test_malformed_data_raises_spec_error_with_the_path(data: object, needle: str) -> None:
    with pytest.raises(SpecError) as error:
        from_dict(data, allow=kit.ALLOW)
    assert needle in str(error.value)


def test_a_record_s_own_rules_surface_as_spec_error() -> None:
    data = {"__submodules__": "protoformer.transformer.layer:TransformerLayerSubmodules",
            "fields": {"input_layernorm": "protoformer.transformer.norm:RMSNorm",
                       "self_attention": "protoformer.transformer.attention:SelfAttention",
                       "pre_mlp_layernorm": "protoformer.transformer.norm:RMSNorm",
                       "mlp": "protoformer.transformer.mlp:MLP",
                       "pre_cross_attn_layernorm": "protoformer.transformer.norm:RMSNorm"}}
    with pytest.raises(SpecError) as error:
        from_dict(data)
    assert "TransformerLayerSubmodules" in str(error.value)


def test_absurdly_deep_data_is_a_spec_error() -> None:
    deep: object = []
    for _ in range(50_000):
        deep = [deep]
    with pytest.raises(SpecError, match="nested too deeply"):
        from_dict(_inner(norm=_norm_partial(names=deep)), allow=kit.ALLOW)


def test_nested_errors_name_the_full_path() -> None:
    data = to_dict(kit.full_spec())
    fields = data["fields"]
    assert isinstance(fields, dict)
    block = fields["block"]
    assert isinstance(block, dict) and isinstance(block["kwargs"], dict)
    submodules = block["kwargs"]["submodules"]
    assert isinstance(submodules, dict) and isinstance(submodules["fields"], dict)
    submodules["fields"]["proj"] = {"__partial__": "tests.spec.spec_testkit:scaled_proj", "args": [{1: 2}]}
    with pytest.raises(SpecError, match=r"^block\.submodules\.proj\[0\]: key 1"):
        from_dict(data, allow=kit.ALLOW)


@pytest.mark.parametrize("text, fmt, needle", [
    ("{", "json", "not a valid JSON file"),
    ('{"__submodules__": "a:B", "__submodules__": "c:D"}', "json", "duplicate key"),
    ("x = ", "toml", "not a valid TOML file"),
    ("[", "yaml", "not a valid YAML file"),
    ("- 1", "yaml", "expected a record"),
    ("fields: {when: 2020-01-01}\n__submodules__: tests.spec.spec_testkit:InnerSubmodules", "yaml",
     "has no field(s) ['when']"),
])
def test_malformed_files_raise_spec_error(text: str, fmt: str, needle: str) -> None:
    if fmt == "yaml" and not HAS_YAML:
        pytest.skip("PyYAML is not installed")
    with pytest.raises(SpecError) as error:
        loads_spec(text, fmt, allow=kit.ALLOW, source="my.spec")  # type: ignore[arg-type]
    assert needle in str(error.value) and str(error.value).startswith("my.spec: ")


def test_toml_reading_without_tomllib_or_tomli_says_what_to_do(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "version_info", (3, 10, 14))  # as on Python 3.10 ...
    monkeypatch.setitem(sys.modules, "tomli", None)  # ... without the tomli package
    with pytest.raises(SpecError, match=r"needs Python 3\.11"):
        loads_spec('__submodules__ = "x:Y"', "toml")


def test_unknown_suffix_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"suffix '\.txt'"):
        load_spec(tmp_path / "spec.txt")
    with pytest.raises(SpecError, match="suffix"):
        save_spec(kit.small_spec(), tmp_path / "spec")
    with pytest.raises(FileNotFoundError):
        load_spec(tmp_path / "missing.json")
    with pytest.raises(SpecError, match="format='xml'"):
        save_spec(kit.small_spec(), tmp_path / "spec.xml", format="xml")  # type: ignore[arg-type]
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(SpecError, match="not a UTF-8 text file"):
        load_spec(tmp_path / "binary.json")
    path = save_spec(kit.small_spec(), tmp_path / "spec.txt", format="toml")
    assert spec_equal(load_spec(path, format="toml", allow=kit.ALLOW), kit.small_spec())


# ---------------------------------------------------------------------------------------------
# The import allowlist.

REFUSED = [
    "os:system",
    "subprocess:run",
    "builtins:eval",
    "notallowed_pkg_xyz:thing",
    "notallowed_pkg_xyz.sub:thing",
    "protoformerx.evil:thing",
    "protoformerx:thing",
    "testsx.spec:Norm",
]
NEVER_IMPORTED = ("notallowed_pkg_xyz", "protoformerx", "testsx")


def _places(name: str) -> list[dict[str, object]]:
    """A spec document that mentions `name` in each place a name can appear."""
    return [
        {"__submodules__": name, "fields": {}},
        _inner(norm=name),
        _inner(norm={"__partial__": name}),
        _inner(norm=_norm_partial(helper={"__ref__": name})),
        _inner(norm=_norm_partial(color={"__enum__": name + ".member"})),
    ]


@pytest.mark.parametrize("name", REFUSED)
def test_names_outside_the_allowlist_are_refused_before_any_import(name: str) -> None:
    for data in _places(name):
        before = set(sys.modules)
        with spy_imports() as spy, pytest.raises(SpecError) as error:
            from_dict(data, allow=kit.ALLOW)
        message = str(error.value)
        assert f"'{name}" in message and "is refused" in message
        assert "'protoformer.'" in message and "'tests.spec.'" in message
        assert "Nothing was imported" in message
        top = name.split(":")[0].split(".")[0]
        assert not [n for n in spy.asked if n.split(".")[0] == top]
        assert set(sys.modules) - before == set()
    for module in NEVER_IMPORTED:
        assert module not in sys.modules


def test_default_allowlist_is_protoformer_only() -> None:
    with spy_imports() as spy, pytest.raises(SpecError) as error:
        from_dict(_inner())
    assert "'tests.spec.spec_testkit:InnerSubmodules' is refused" in str(error.value)
    assert spy.asked == []


def test_spy_sees_imports_that_are_attempted() -> None:
    with spy_imports() as spy, pytest.raises(SpecError, match="cannot import"):
        resolve_reference("protoformer.no_such_module_abc:Thing")
    assert "protoformer.no_such_module_abc" in spy.asked


@pytest.mark.parametrize("name, needle", [
    ("protoformer.transformer.norm:_check_norm_args", "private"),
    ("protoformer.transformer.norm:LayerNorm.__init__", "dunder"),
    ("protoformer.transformer.norm:LayerNorm.__class__", "dunder"),
    ("protoformer.transformer.norm:__builtins__", "dunder"),
    ("protoformer.__main__:Thing", "not a dotted sequence"),
    ("protoformer.transformer.norm:Layer-Norm", "not an identifier"),
    ("protoformer..norm:LayerNorm", "not a dotted sequence"),
    ("protoformer.transformer.norm:", "empty"),
    (":LayerNorm", "not a dotted sequence"),
    ("protoformer.transformer.norm:LayerNorm:x", "not an identifier"),
    ("protoformer.transformer.norm.LayerNorm", "no ':'"),
    ("protoformer.transformer.norm:LayerNorm..x", "not an identifier"),
    ("protoformer.transformer.norm:Lаyer", "not an identifier"),  # Cyrillic 'а'
])
def test_names_reaching_private_or_malformed_attributes_are_refused(name: str, needle: str) -> None:
    with spy_imports() as spy, pytest.raises(SpecError) as error:
        resolve_reference(name)
    assert needle in str(error.value) and name in str(error.value)
    assert spy.asked == []


def test_a_re_export_of_a_foreign_function_is_refused() -> None:
    assert kit.run_command is __import__("os").system
    with pytest.raises(SpecError, match="defined in module"):
        resolve_reference("tests.spec.spec_testkit:run_command", allow=kit.ALLOW)


def test_allow_prefixes_match_whole_module_segments() -> None:
    name = "tests.spec.spec_testkit:Norm"
    for allow in (("tests",), ("tests.spec.",), ("protoformer", "tests.spec.spec_testkit")):
        assert resolve_reference(name, allow=allow) is kit.Norm
    for allow in (("tests.spec.spec_test",), ("tests.sp",), ("test",)):
        with pytest.raises(SpecError, match="is refused"):
            resolve_reference(name, allow=allow)
    with pytest.raises(SpecError, match="is refused"):
        resolve_reference("tests.spec.spec_testkit:Norm", allow=())


@pytest.mark.parametrize("allow", [("",), (".",), ("a b",), ("protoformer..x",), (3,)])
def test_malformed_allow_prefixes_are_rejected(allow: tuple[object, ...]) -> None:
    with pytest.raises(SpecError, match="not a dotted module path"):
        resolve_reference("protoformer.transformer.norm:LayerNorm", allow=allow)  # type: ignore[arg-type]


def test_allow_as_a_bare_string_is_rejected() -> None:
    with pytest.raises(SpecError, match="single string"):
        from_dict(_inner(), allow="tests.spec.")


# ---------------------------------------------------------------------------------------------
# Random damage to a real spec document.


def _locations(node: object, at: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    found: list[tuple[object, ...]] = [at]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _locations(value, (*at, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _locations(value, (*at, index))
    return found


def _replaced(node: object, at: tuple[object, ...], value: object) -> object:
    if not at:
        return value
    head, rest = at[0], at[1:]
    if isinstance(node, dict):
        return {k: (_replaced(v, rest, value) if k == head else v) for k, v in node.items()}
    assert isinstance(node, list)
    return [(_replaced(v, rest, value) if i == head else v) for i, v in enumerate(node)]


def _document() -> dict[str, object]:
    from protoformer.backends import get_backend
    from protoformer.recipes.gpt import gpt_layer_spec

    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                               qk_layernorm=True)
    data = to_dict(gpt_layer_spec(get_backend("local"), config))
    fields = data["fields"]
    assert isinstance(fields, dict)
    fields["input_layernorm"] = {"__partial__": "protoformer.transformer.norm:RMSNorm",
                                 "args": [], "kwargs": {"eps": 1e-6}}
    return data


DOCUMENT = _document()
NAMES = ["protoformer.transformer.norm:LayerNorm", "protoformer.parallel.layers:Linear",
         "protoformer.transformer.mlp:MLPSubmodules", "protoformer.transformer.enums:AttnMaskType",
         *REFUSED]
NODES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
    | st.sampled_from(NAMES),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(["__partial__", "__submodules__", "__enum__", "__ref__",
                                       "__tuple__", "__null__", "args", "kwargs", "fields", "x"])
                      | st.text(max_size=4), children, max_size=3),
    max_leaves=5,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(where=st.sampled_from(_locations(DOCUMENT)), value=NODES)
def test_damaged_documents_load_or_raise_spec_error(where: tuple[object, ...], value: object) -> None:
    modules_before = set(sys.modules)
    with spy_imports() as spy:
        try:
            spec = from_dict(_replaced(DOCUMENT, where, value))
        except SpecError:
            spec = None
    if spec is not None:
        assert spec_equal(from_dict(to_dict(spec)), spec)
    assert all(n == "protoformer" or n.startswith("protoformer.") for n in spy.asked), spy.asked
    assert {m for m in set(sys.modules) - modules_before if not m.startswith("protoformer.")} \
        == set()
