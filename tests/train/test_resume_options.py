"""Review finding: resuming with --steps at or below the checkpoint's step trains nothing, and
used to say only "resumed ... at step N", as if the requested run had happened."""

from __future__ import annotations

import json
from pathlib import Path

from protoformer.train.loop import TrainOptions, train


def _options(out: Path, **overrides: object) -> TrainOptions:
    settings: dict[str, object] = {
        "preset": "tiny", "steps": 4, "out_dir": out, "batch_size": 2, "seq_len": 16,
        "warmup_steps": 1, "eval_every": 4, "eval_batches": 1, "save_every": 4, "log_every": 4,
        "seed": 0, "device": "cpu", "max_corpus_bytes": 20_000, "progress": False}
    settings.update(overrides)
    return TrainOptions(**settings)  # type: ignore[arg-type]


def test_resuming_past_the_requested_steps_says_nothing_was_trained(tmp_path: Path) -> None:
    train(_options(tmp_path))
    resumed = train(_options(tmp_path, steps=2, resume=True))
    assert resumed.steps_run == 0
    assert [step for step, _ in resumed.train_losses] == [1, 2, 3, 4]  # the checkpoint's history
    assert any("nothing left to train" in message and "--steps 2" in message
               for message in resumed.messages)


def test_resuming_below_the_requested_steps_has_no_such_note(tmp_path: Path) -> None:
    train(_options(tmp_path))
    resumed = train(_options(tmp_path, steps=5, resume=True))
    assert resumed.steps_run == 1
    assert not any("nothing left to train" in message for message in resumed.messages)


def test_a_resumed_run_uses_its_own_weight_decay_and_betas(tmp_path: Path) -> None:
    """They used to come silently from the checkpoint's optimizer state, while the new
    checkpoint's train_options recorded the values given (and not used)."""
    train(_options(tmp_path))
    resumed = train(_options(tmp_path, steps=6, resume=True, weight_decay=0.0, betas=(0.5, 0.6)))
    assert resumed.checkpoint is not None
    state = json.loads((resumed.checkpoint / "state.json").read_text(encoding="utf-8"))
    assert state["train_options"]["weight_decay"] == 0.0
    assert state["train_options"]["betas"] == [0.5, 0.6]
    groups = state["optimizer"]["param_groups"]
    assert [group["weight_decay"] for group in groups] == [0.0, 0.0]
    assert [group["betas"] for group in groups] == [{"__tuple__": [0.5, 0.6]}] * 2
