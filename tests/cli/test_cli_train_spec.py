"""`protoformer train --spec FILE --set PATH=VALUE --allow PREFIX`: the resolved layer spec is
stored in the checkpoint, and `--resume` and `generate --checkpoint` rebuild the same model."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from protoformer.backends import get_backend
from protoformer.cli import main
from protoformer.cli.generate import load_model
from protoformer.recipes import get_preset
from protoformer.spec import SpecError, apply_overrides, load_spec, save_spec, to_dict
from protoformer.transformer.attention import SelfAttention
from protoformer.transformer.core_attention import DotProductAttention

DOT = "protoformer.transformer.core_attention:DotProductAttention"
SET_DOT = f"self_attention.core_attention={DOT}"
TRAIN = ["--batch-size", "2", "--seq-len", "16", "--eval-every", "5", "--save-every", "5",
         "--log-every", "5", "--device", "cpu", "--seed", "7", "--no-sample"]


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    preset = get_preset("tiny")
    path = tmp_path / "layer.json"
    save_spec(preset.layer_spec(get_backend("local"), preset.config()), path)
    return path


def _state(run: Path) -> dict[str, object]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    state: dict[str, object] = json.loads((run / "checkpoints" / latest / "state.json").read_text())
    return state


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("protoformer: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_spec_run_stores_the_resolved_spec_and_resumes_and_generates_with_it(
        spec_file: Path, corpus_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["train", "--spec", str(spec_file), "--set", SET_DOT, "--out", str(run),
                 "--data", str(corpus_file), "--steps", "3", *TRAIN]) == 0
    expected = to_dict(apply_overrides(load_spec(spec_file), [SET_DOT]))
    state = _state(run)
    assert state["layer_spec"] == expected
    assert DOT in json.dumps(state["layer_spec"])
    options = state["train_options"]
    assert isinstance(options, dict)
    assert options["spec"] == str(spec_file) and options["overrides"] == [SET_DOT]

    # The checkpoint, not the file, defines the model: editing the file changes nothing.
    spec_file.write_text("this is no longer a spec")
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--steps", "5", "--no-sample"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step 5/5" in out
    assert _state(run)["layer_spec"] == expected

    model, _ = load_model(run, device="cpu")
    attention = model.decoder.layers[0].self_attention
    assert isinstance(attention, SelfAttention)
    assert isinstance(attention.core_attention, DotProductAttention)
    assert main(["generate", "--checkpoint", str(run), "--prompt", "def ",
                 "--max-new-tokens", "6", "--greedy", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("def ")


def test_set_without_spec_edits_the_presets_recipe(corpus_file: Path, tmp_path: Path) -> None:
    assert main(["train", "--set", SET_DOT, "--out", str(tmp_path), "--data", str(corpus_file),
                 "--steps", "1", *TRAIN]) == 0
    assert DOT in json.dumps(_state(tmp_path)["layer_spec"])


def test_a_run_without_spec_options_stores_no_spec(trained_run: Path) -> None:
    assert "layer_spec" not in _state(trained_run)


def test_resume_refuses_different_overrides(spec_file: Path, corpus_file: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--spec", str(spec_file), "--out", str(tmp_path), "--data",
                 str(corpus_file), "--steps", "1", *TRAIN]) == 0
    err = _one_line_error(capsys, ["train", "--out", str(tmp_path), "--resume", "--steps", "2",
                                   "--set", SET_DOT])
    assert "overrides" in err and "cannot resume" in err


def test_miswired_set_is_a_one_line_error_naming_the_slot(
        spec_file: Path, corpus_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    err = _one_line_error(capsys, [
        "train", "--spec", str(spec_file), "--out", str(tmp_path), "--data", str(corpus_file),
        "--set", "self_attention.linear_proj=protoformer.parallel.layers:ColumnParallelLinear",
        "--steps", "1", *TRAIN])
    assert "linear_proj" in err and "RowParallelLinearBuilder" in err
    assert not (tmp_path / "checkpoints").exists()


def test_an_os_system_spec_is_refused(corpus_file: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.json"
    path.write_text('{"__submodules__": "os:system", "fields": {}}')
    err = _one_line_error(capsys, ["train", "--spec", str(path), "--out", str(tmp_path / "run"),
                                   "--data", str(corpus_file), "--steps", "1", *TRAIN])
    assert "os" in err and "allowed module prefixes" in err


def test_a_module_outside_allow_is_refused_unless_allowed(
        corpus_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = "protoformer_train_not_allowed_xyz"
    sys.modules.pop(name, None)
    err = _one_line_error(capsys, ["train", "--set", f"self_attention.core_attention={name}:X",
                                   "--out", str(tmp_path), "--data", str(corpus_file),
                                   "--steps", "1", *TRAIN])
    assert "outside the allowed module prefixes" in err
    assert name not in sys.modules


def test_an_mla_spec_on_a_dense_preset_fails_at_model_build(
        corpus_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mla = get_preset("tiny-mla")
    path = tmp_path / "mla.json"
    save_spec(mla.layer_spec(get_backend("local"), mla.config()), path)
    err = _one_line_error(capsys, ["train", "--preset", "tiny", "--spec", str(path), "--out",
                                   str(tmp_path / "run"), "--data", str(corpus_file),
                                   "--steps", "1", *TRAIN])
    assert f"--spec {path} does not fit preset 'tiny'" in err
    assert "MLATransformerConfig" in err


def test_generate_uses_the_runs_allow_list(spec_file: Path, corpus_file: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # A builder from a user package (here a test module on sys.path) needs --allow to train,
    # and generate rebuilds it with the allow list the run was started with.
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "my_layers_for_cli_test.py").write_text(
        "from protoformer.transformer.core_attention import DotProductAttention\n\n\n"
        "class MyAttention(DotProductAttention):\n    pass\n")
    monkeypatch.syspath_prepend(str(package))
    monkeypatch.delitem(sys.modules, "my_layers_for_cli_test", raising=False)
    run = tmp_path / "run"
    override = "self_attention.core_attention=my_layers_for_cli_test:MyAttention"
    assert main(["train", "--spec", str(spec_file), "--set", override, "--out", str(run),
                 "--data", str(corpus_file), "--steps", "1", *TRAIN]) == 1
    assert main(["train", "--spec", str(spec_file), "--set", override, "--allow",
                 "my_layers_for_cli_test", "--out", str(run), "--data", str(corpus_file),
                 "--steps", "1", *TRAIN]) == 0
    # The checkpoint alone never widens the allowlist: loading needs --allow again.
    with pytest.raises(SpecError, match="my_layers_for_cli_test"):
        load_model(run, device="cpu")
    model, _ = load_model(run, device="cpu", allow=["my_layers_for_cli_test"])
    attention = model.decoder.layers[0].self_attention
    assert isinstance(attention, SelfAttention)
    assert type(attention.core_attention).__name__ == "MyAttention"
    # Resume likewise refuses without --allow, and continues with it.
    assert main(["train", "--out", str(run), "--resume", "--steps", "2"]) == 1
    assert main(["train", "--out", str(run), "--resume", "--steps", "2",
                 "--allow", "my_layers_for_cli_test"]) == 0


def test_spec_run_copies_are_independent(spec_file: Path, corpus_file: Path,
                                         tmp_path: Path) -> None:
    # A copied run directory resumes on its own (the spec lives in the checkpoint).
    run = tmp_path / "run"
    assert main(["train", "--spec", str(spec_file), "--out", str(run), "--data",
                 str(corpus_file), "--steps", "1", *TRAIN]) == 0
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    spec_file.unlink()
    assert main(["train", "--out", str(copy), "--resume", "--steps", "2", "--no-sample"]) == 0
