"""`protoformer inspect --spec FILE --set PATH=VALUE`: specs from files, overridden, still checked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from protoformer.backends import get_backend
from protoformer.cli import main
from protoformer.recipes import get_preset
from protoformer.spec import save_spec

DOT = "protoformer.transformer.core_attention:DotProductAttention"


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    preset = get_preset("tiny")
    path = tmp_path / "layer.json"
    save_spec(preset.layer_spec(get_backend("local"), preset.config()), path)
    return path


def test_inspect_uses_the_spec_file_with_an_override(spec_file: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["inspect", "tiny", "--spec", str(spec_file),
                   "--set", f"self_attention.core_attention={DOT}"])
    out = capsys.readouterr().out
    assert status == 0
    line = next(row for row in out.splitlines() if "submodules.core_attention" in row)
    assert "DotProductAttention" in line


def test_set_without_spec_overrides_the_preset_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "tiny", "--set", f"self_attention.core_attention={DOT}"]) == 0
    assert "DotProductAttention" in capsys.readouterr().out


def test_miswiring_override_is_one_line_error_naming_the_slot(
        capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["inspect", "tiny", "--set",
                   "self_attention.linear_proj=protoformer.parallel.layers:ColumnParallelLinear"])
    err = capsys.readouterr().err
    assert status == 1
    assert len(err.strip().splitlines()) == 1
    assert "linear_proj" in err and "RowParallelLinearBuilder" in err


def test_disallowed_module_is_refused_without_import(capsys: pytest.CaptureFixture[str]) -> None:
    name = "protoformer_cli_not_allowed_xyz"
    sys.modules.pop(name, None)
    status = main(["inspect", "tiny", "--set", f"self_attention.core_attention={name}:Thing"])
    assert status == 1
    assert "outside the allowed module prefixes" in capsys.readouterr().err
    assert name not in sys.modules


def test_a_spec_file_naming_os_system_is_refused(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.json"
    path.write_text('{"__submodules__": "os:system", "fields": {}}')
    assert main(["inspect", "tiny", "--spec", str(path)]) == 1
    assert "os" in capsys.readouterr().err
