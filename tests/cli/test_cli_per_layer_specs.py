"""Per-layer specs on the command line: `inspect` groups equal neighbouring layers, and a
training run with a list of layer specs stores it, resumes and generates with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protoformer.backends import get_backend
from protoformer.cli import main
from protoformer.cli.generate import load_model
from protoformer.recipes import get_preset
from protoformer.spec import apply_overrides, load_spec, save_spec, to_dict
from protoformer.transformer.attention import SelfAttention
from protoformer.transformer.core_attention import DotProductAttention, SDPAttention
from protoformer.transformer.norm import LayerNorm, RMSNorm

DOT = "protoformer.transformer.core_attention:DotProductAttention"
LAYERNORM = "protoformer.transformer.norm:LayerNorm"
TRAIN = ["--batch-size", "2", "--seq-len", "16", "--eval-every", "5", "--save-every", "5",
         "--log-every", "5", "--device", "cpu", "--seed", "7", "--no-sample"]


def _state(run: Path) -> dict[str, object]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    state: dict[str, object] = json.loads((run / "checkpoints" / latest / "state.json").read_text())
    return state


def test_inspect_groups_equal_neighbouring_layers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "tiny"]) == 0
    plain = capsys.readouterr().out
    assert "kind" not in plain and "layer spec (TransformerLayerSubmodules)" in plain
    assert main(["inspect", "tiny", "--set", f"layers.2-3.input_layernorm={LAYERNORM}",
                 "--set", f"layers.3.pre_mlp_layernorm={LAYERNORM}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("layer specs (TransformerLayerSubmodules): 3 kinds over 4 layers, equal "
                        "neighbouring layers grouped:")
    assert [line.split() for line in lines[start + 1:start + 4]] == [
        ["layers", "0-1", "2", "x", "kind", "1"],
        "layer 2 1 x kind 2 (differs from kind 1 at input_layernorm)".split(),
        "layer 3 1 x kind 3 (differs from kind 1 at input_layernorm, pre_mlp_layernorm)".split()]
    kind3 = lines.index("kind 3 (layer 3), the slots that differ from kind 1:")
    assert [line.split()[:2] for line in lines[kind3 + 1:kind3 + 3]] == [
        ["input_layernorm", "LayerNorm"], ["pre_mlp_layernorm", "LayerNorm"]]
    assert lines[kind3 + 3] == ""
    # LayerNorm carries a bias where RMSNorm has none: 3 layer norms of hidden size 128 more,
    # and the final norm, built like the last layer's input norm.
    total = next(line for line in lines if line.strip().startswith("total "))
    assert main(["inspect", "tiny"]) == 0
    plain_total = next(line for line in capsys.readouterr().out.splitlines()
                       if line.strip().startswith("total "))
    count = int(total.split()[1].replace(",", ""))
    assert count == int(plain_total.split()[1].replace(",", "")) + 4 * 128


def test_a_per_layer_run_stores_the_list_resumes_and_generates_with_it(
        corpus_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    preset = get_preset("tiny")
    spec = preset.layer_spec(get_backend("local"), preset.config())
    specs = apply_overrides([spec] * 4, [f"layers.2-3.self_attention.core_attention={DOT}"])
    spec_file = save_spec(specs, tmp_path / "layers.toml")
    run = tmp_path / "run"
    assert main(["train", "--spec", str(spec_file), "--set", f"layers.0.input_layernorm={LAYERNORM}",
                 "--out", str(run), "--data", str(corpus_file), "--steps", "3", *TRAIN]) == 0
    loaded = load_spec(spec_file)
    assert isinstance(loaded, list)
    expected = to_dict(apply_overrides(loaded, [f"layers.0.input_layernorm={LAYERNORM}"]))
    assert _state(run)["layer_spec"] == expected
    assert list(expected["__layers__"]) == ["0", "1", "2-3"]  # type: ignore[arg-type]

    spec_file.write_text("no longer a spec")  # the checkpoint, not the file, defines the model
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--steps", "5", "--no-sample"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert _state(run)["layer_spec"] == expected

    model, _ = load_model(run, device="cpu")
    cores: list[type] = []
    for layer in model.decoder.layers:
        attention = layer.self_attention
        assert isinstance(attention, SelfAttention)
        cores.append(type(attention.core_attention))
    assert cores == [SDPAttention, SDPAttention, DotProductAttention, DotProductAttention]
    norms = [type(layer.input_layernorm) for layer in model.decoder.layers]
    assert norms == [LayerNorm, RMSNorm, RMSNorm, RMSNorm]
    assert main(["generate", "--checkpoint", str(run), "--prompt", "def ",
                 "--max-new-tokens", "4", "--greedy", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("def ")


def test_a_list_of_the_wrong_length_is_a_one_line_error(
        corpus_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    preset = get_preset("tiny")
    spec = preset.layer_spec(get_backend("local"), preset.config())
    spec_file = save_spec([spec] * 3, tmp_path / "three.json")
    assert main(["train", "--spec", str(spec_file), "--out", str(tmp_path / "run"), "--data",
                 str(corpus_file), "--steps", "1", *TRAIN]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "holds 3 layer spec(s) but the model has num_layers=4" in err
    assert not (tmp_path / "run" / "checkpoints").exists()
