"""Lists of per-layer specs as data: files, `diff`, overrides (`layers.3...`), errors.

The expected file contents and diff paths are written out here by hand; round trips are
checked with `spec_equal` (the very same builders) and by comparing the written text.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from protoformer.backends import get_backend
from protoformer.recipes import get_preset
from protoformer.spec import (
    SpecDifference,
    SpecError,
    apply_overrides,
    diff,
    dumps_spec,
    from_dict,
    load_spec,
    loads_spec,
    save_spec,
    spec_equal,
    to_dict,
)
from protoformer.transformer.core_attention import DotProductAttention, SDPAttention
from protoformer.transformer.layer import TransformerLayerSubmodules
from protoformer.transformer.norm import LayerNorm, RMSNorm

HAS_YAML = importlib.util.find_spec("yaml") is not None
FORMATS = ["json", "toml", pytest.param("yaml", marks=pytest.mark.skipif(
    not HAS_YAML, reason="PyYAML is not installed"))]
LAYER_RECORD = "protoformer.transformer.layer:TransformerLayerSubmodules"
NORM = "protoformer.transformer.norm"


def _tiny_spec() -> TransformerLayerSubmodules:
    preset = get_preset("tiny")
    spec = preset.layer_spec(get_backend("local"), preset.config())
    assert isinstance(spec, TransformerLayerSubmodules)
    return spec


def _with_layernorm(spec: TransformerLayerSubmodules) -> TransformerLayerSubmodules:
    return dataclasses.replace(spec, input_layernorm=LayerNorm)


def test_equal_neighbours_are_written_once_under_their_range() -> None:
    rms = _tiny_spec()
    ln = _with_layernorm(rms)
    data = to_dict([rms, rms, rms, ln, rms])
    groups = data["__layers__"]
    assert isinstance(groups, dict) and list(groups) == ["0-2", "3", "4"]
    assert groups["0-2"] == to_dict(rms) and groups["4"] == to_dict(rms)
    assert groups["3"] == to_dict(ln)
    assert json.dumps(groups["3"]).count(f'"{NORM}:LayerNorm"') == 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_list_round_trips_through_every_file_format(fmt: str, tmp_path: Path) -> None:
    rms = _tiny_spec()
    specs = [rms, _with_layernorm(rms), _with_layernorm(rms), rms]
    path = save_spec(specs, tmp_path / f"layers.{fmt}")
    back = load_spec(path)
    assert isinstance(back, list) and len(back) == 4
    assert spec_equal(back, specs)
    assert [type(s) for s in back] == [TransformerLayerSubmodules] * 4
    assert back[1].input_layernorm is LayerNorm and back[0].input_layernorm is RMSNorm
    assert dumps_spec(back, fmt) == path.read_text()  # type: ignore[arg-type]


def test_a_single_spec_file_still_reads_as_one_record(tmp_path: Path) -> None:
    spec = _tiny_spec()
    text = dumps_spec(spec)
    assert "__layers__" not in text and json.loads(text)["__submodules__"] == LAYER_RECORD
    back = loads_spec(text)
    assert isinstance(back, TransformerLayerSubmodules) and spec_equal(back, spec)


@pytest.mark.parametrize(("layers", "message"), [
    ({"0-1": "R", "3": "R"}, r"layers.3: layer\(s\) 2 are missing"),
    ({"1-3": "R"}, r"layers.1-3: layer\(s\) 0 are missing"),
    ({"0-2": "R", "2": "R"}, r"layers.2: layer 2 appears twice"),
    ({"0-x": "R"}, r"key '0-x' is not a layer index or range"),
    ({"3-1": "R"}, r"key '3-1' is not a layer index or range"),
    ({"01": "R"}, r"key '01' is not a layer index"),
    ({}, r"no layers"),
    ({"0": {"__submodules__": "protoformer.transformer.mlp:MLPSubmodules", "fields": {}}},
     r"layers.0: MLPSubmodules is missing required field"),
])
def test_malformed_layer_groups_name_the_problem(layers: dict[str, object], message: str) -> None:
    record = to_dict(_tiny_spec())
    data = {"__layers__": {k: (record if v == "R" else v) for k, v in layers.items()}}
    with pytest.raises(SpecError, match=message):
        from_dict(data)


def test_a_layers_document_takes_no_other_keys() -> None:
    with pytest.raises(SpecError, match=r"unknown key\(s\) \['fields'\]"):
        from_dict({"__layers__": {"0": to_dict(_tiny_spec())}, "fields": {}})


def test_to_dict_refuses_an_empty_list_and_foreign_elements() -> None:
    with pytest.raises(SpecError, match="empty"):
        to_dict([])
    with pytest.raises(SpecError, match=r"layers.1: expected a Submodules record"):
        to_dict([_tiny_spec(), "RMSNorm"])  # type: ignore[list-item]


def test_diff_of_lists_names_layers_and_groups_alike_neighbours() -> None:
    rms = _tiny_spec()
    ln = _with_layernorm(rms)
    assert diff([rms] * 3, [rms] * 3) == []
    assert diff([rms, rms, rms, rms], [rms, ln, ln, rms]) == [
        SpecDifference("layers.1-2.input_layernorm", f"{NORM}:RMSNorm", f"{NORM}:LayerNorm")]
    # One spec against a list stands for that spec in every layer.
    assert diff(rms, [rms, ln]) == [
        SpecDifference("layers.1.input_layernorm", f"{NORM}:RMSNorm", f"{NORM}:LayerNorm")]
    assert diff([ln, rms], rms) == [
        SpecDifference("layers.0.input_layernorm", f"{NORM}:LayerNorm", f"{NORM}:RMSNorm")]
    assert diff([rms, rms], [rms, rms, rms]) == [SpecDifference("layers", "2 layers", "3 layers")]


def test_overrides_reach_one_layer_a_range_or_every_layer() -> None:
    rms = _tiny_spec()
    specs = [rms] * 5
    dot = "protoformer.transformer.core_attention:DotProductAttention"
    one = apply_overrides(specs, [f"layers.3.self_attention.core_attention={dot}"])
    cores = [s.self_attention.keywords["submodules"].core_attention  # type: ignore[attr-defined]
             for s in one]
    assert cores == [SDPAttention, SDPAttention, SDPAttention, DotProductAttention, SDPAttention]
    ranged = apply_overrides(specs, [f"layers.1-2.input_layernorm={NORM}:LayerNorm",
                                     "layers.*.pre_mlp_layernorm=" + f"{NORM}:LayerNorm"])
    assert [s.input_layernorm for s in ranged] == [RMSNorm, LayerNorm, LayerNorm, RMSNorm, RMSNorm]
    assert all(s.pre_mlp_layernorm is LayerNorm for s in ranged)
    assert specs == [rms] * 5 and rms.input_layernorm is RMSNorm  # the input is not changed


@pytest.mark.parametrize(("assignment", "message"), [
    ("input_layernorm=x:Y", r"start the path with layers.N.*layers.\*.input_layernorm"),
    ("layers.5.input_layernorm=x:Y", r"layers.5: the spec has 3 layer\(s\) \(0..2\)"),
    ("layers.2-1.input_layernorm=x:Y", r"name layers as layers.N"),
    ("layers.1=x:Y", r"layers.1 names whole layers; override a slot inside them"),
    ("layers.0.mlp.nope.deeper=1", r"layers.0.mlp \(partial.*has no keyword 'nope'"),
    ("layers.0.input_layernorm=protoformer.transformer.mlp:MLP",
     r"layers.0: TransformerLayerSubmodules.input_layernorm: .*does not satisfy LayerNormBuilder"),
    ("layers.0", r"expected PATH=VALUE"),
])
def test_bad_layer_overrides_name_the_problem(assignment: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        apply_overrides([_tiny_spec()] * 3, [assignment])


def test_a_layer_path_on_one_spec_for_every_layer_says_to_use_a_list() -> None:
    with pytest.raises(SpecError, match=r"one spec for every layer.*\[spec\] \* num_layers"):
        apply_overrides(_tiny_spec(), [f"layers.1.input_layernorm={NORM}:LayerNorm"])
