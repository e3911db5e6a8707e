"""`protoformer train --config run.toml`: every flag a key, the command line wins, typos refused."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from protoformer.cli import build_parser, main
from protoformer.cli.train import config_document, options_from_args
from protoformer.cli.train_config import toml_text
from protoformer.train.options import TrainOptions


def _options(argv: list[str]) -> TrainOptions:
    return options_from_args(build_parser().parse_args(["train", *argv]))


def _train_flags() -> list[argparse.Action]:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    train = commands.choices["train"]
    return [a for a in train._actions if a.option_strings and a.dest != "help"]


def test_config_values_apply_and_command_line_flags_win(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text('steps = 7\nbatch-size = 3\nseq_len = 32\nlr = 1e-3\nbf16 = true\n'
                      'data = "corpus.txt"\nset = ["input_layernorm.eps=1e-6"]\n'
                      'lr-decay-style = "WSD"\nadam-beta2 = 0.99\nclip-grad = 0.5\n')
    options = _options(["--config", str(config)])
    assert (options.steps, options.batch_size, options.seq_len, options.lr) == (7, 3, 32, 1e-3)
    assert options.precision == "bf16" and options.data == Path("corpus.txt")
    assert options.overrides == ("input_layernorm.eps=1e-6",)
    assert options.lr_decay_style == "WSD" and options.betas == (0.9, 0.99)
    assert options.grad_clip == 0.5
    for argv in (["--steps", "9", "--config", str(config)],
                 ["--config", str(config), "--steps", "9"]):
        assert _options(argv).steps == 9  # before or after --config, the command line wins
    assert _options(["--fp32", "--config", str(config)]).precision == "fp32"


def test_the_resolved_config_round_trips_and_covers_every_flag(tmp_path: Path) -> None:
    resolved = TrainOptions(steps=12, lr_decay_style="linear", tokenizer="tok.json",
                            min_lr=1e-4, precision="fp32", tensorboard=True, batch_size=8,
                            micro_batch_size=2)
    document = config_document(resolved)
    config = tmp_path / "config.toml"
    config.write_text(toml_text(document))
    again = _options(["--config", str(config)])
    for name in ("steps", "lr_decay_style", "tokenizer", "min_lr", "precision", "tensorboard",
                 "betas", "grad_clip", "out_dir", "seq_len", "backend", "batch_size",
                 "micro_batch_size"):
        assert getattr(again, name) == getattr(resolved, name), name
    # Every flag that defines a run is a key of the resolved file (the rest say how to run it),
    # unless its value is unset (TOML has no null).
    how_to_run = {"--config", "--resume", "--overwrite", "--no-sample", "--bf16", "--fp32",
                  "--global-batch-size"}  # the last: Megatron's name for batch-size, written so
    keys = set(document)
    for action in _train_flags():
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not set(longs) & how_to_run:
            unset = getattr(resolved, action.dest, "set") is None
            assert unset or any(o[2:] in keys for o in longs), longs


@pytest.mark.parametrize(("text", "needle"), [
    ("stpes = 5\n", "unknown key 'stpes'"),
    ("steps = \"five\"\n", "key 'steps' (--steps) must be an integer"),
    ("bf16 = 1\n", "key 'bf16' (--bf16) must be true or false"),
    ("lr-decay-style = \"cosin\"\n", "key 'lr-decay-style' is 'cosin'; choose from"),
    ("steps = \n", "not valid TOML"),
])
def test_config_mistakes_are_one_line_naming_the_key(tmp_path: Path, text: str, needle: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "run.toml"
    config.write_text(text)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("protoformer: error: --config") and err.count("\n") == 1, err
    assert needle in err, err
    assert not (tmp_path / "run").exists()  # refused before anything was written
