"""`protoformer check FILE.py[:FUNCTION]` on user recipe files."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from protoformer.cli import main

GOOD = """
from protoformer.recipes import gpt_layer_spec

def spec(backend, config):
    return gpt_layer_spec(backend, config)
"""

MISWIRED = """
from protoformer.parallel import ColumnParallelLinear
from protoformer.transformer.attention import SelfAttentionSubmodules


def attention_spec(backend, config) -> SelfAttentionSubmodules:
    return SelfAttentionSubmodules(
        linear_qkv=backend.column_parallel_linear(),
        core_attention=backend.core_attention(),
        linear_proj=ColumnParallelLinear,  # a column-parallel linear in a row-parallel slot
    )
"""


def _write(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def test_a_correct_recipe_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "good.py", GOOD)
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: ") and " slots checked" in out


def test_a_miswired_recipe_fails_naming_the_slot(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "bad.py", MISWIRED)
    assert main(["check", str(path)]) == 1  # found without naming it: the only Submodules function
    err = capsys.readouterr().err
    assert "SelfAttentionSubmodules.linear_proj" in err
    assert "input_is_parallel" in err  # one of the mismatches, each listed
    assert "Traceback" not in err
    assert main(["check", f"{path}:attention_spec"]) == 1


def test_a_function_without_arguments_is_called_bare(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    source = GOOD + textwrap.dedent("""
        from protoformer.backends import get_backend
        from protoformer.recipes import get_preset

        def layer():
            return spec(get_backend("local"), get_preset("tiny-gqa").config())
    """)
    path = _write(tmp_path, "bare.py", source)
    assert main(["check", f"{path}:layer"]) == 0
    assert "ok: " in capsys.readouterr().out


@pytest.mark.parametrize(("source", "target_suffix", "message"), [
    ("def helper():\n    return 1\n", "", "name the recipe"),
    ("def spec():\n    return 42\n", "", "returned int, not a Submodules"),
    (GOOD, ":missing", "has no function 'missing'"),
])
def test_unusable_targets_give_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               source: str, target_suffix: str,
                                               message: str) -> None:
    path = _write(tmp_path, "recipe.py", source)
    assert main(["check", f"{path}{target_suffix}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("protoformer: error: ") and message in err
    assert err.count("\n") == 1


def test_the_preset_option_picks_the_config(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    source = """
        from protoformer.recipes import mla_layer_spec

        def spec(backend, config):
            return mla_layer_spec(backend, config)
    """
    path = _write(tmp_path, "mla.py", source)
    assert main(["check", str(path), "--preset", "tiny-mla"]) == 0
    assert "ok: " in capsys.readouterr().out


def test_every_miswired_slot_is_reported(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    source = """
        from protoformer.parallel import ColumnParallelLinear, RowParallelLinear
        from protoformer.transformer.attention import SelfAttentionSubmodules

        def spec(backend, config):
            return SelfAttentionSubmodules(linear_qkv=RowParallelLinear,
                                           core_attention=backend.core_attention(),
                                           linear_proj=ColumnParallelLinear)
    """
    path = _write(tmp_path, "two.py", source)
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert "SelfAttentionSubmodules.linear_qkv" in err
    assert "SelfAttentionSubmodules.linear_proj" in err


PER_LAYER = """
import dataclasses
from protoformer.parallel import ColumnParallelLinear
from protoformer.recipes import gpt_layer_spec

def spec(backend, config):
    good = gpt_layer_spec(backend, config)
    bad = dataclasses.replace(good)
    object.__setattr__(bad, "pre_mlp_layernorm", ColumnParallelLinear)  # edited after the check
    return [good, good, bad, good]
"""


def test_a_per_layer_recipe_is_checked_group_by_group(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "layers.py", PER_LAYER)
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert "at layers.2: " in err and "pre_mlp_layernorm" in err
    assert "layers.0-1" not in err and "layers.3" not in err
    good = _write(tmp_path, "good_layers.py", GOOD.replace(
        "return gpt_layer_spec(backend, config)", "return [gpt_layer_spec(backend, config)] * 4"))
    assert main(["check", str(good)]) == 0
    single = _write(tmp_path, "single.py", GOOD)
    assert main(["check", str(single)]) == 0
    out = capsys.readouterr().out.splitlines()
    # one group of four equal layers is checked once: as many slots as the single spec
    assert out[0].split(" slots")[0] == out[1].split(" slots")[0]
