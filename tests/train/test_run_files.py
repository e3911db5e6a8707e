"""Run directories (`--out`) and the metrics log: checked up front, never mixed across runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from protoformer.train.metrics import MetricsLog, memory_gib, peak_flops, perplexity
from protoformer.train.run_dir import check_run_directory


def test_a_new_run_refuses_a_directory_holding_another_run(tmp_path: Path) -> None:
    check_run_directory(tmp_path / "new", resume=False, overwrite=False)  # absent: fine
    (tmp_path / "notes.txt").write_text("mine")
    check_run_directory(tmp_path, resume=False, overwrite=False)  # not a run: fine
    (tmp_path / "checkpoints" / "step_000001").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match=r"already holds a run \(checkpoints, metrics.jsonl\)"):
        check_run_directory(tmp_path, resume=False, overwrite=False)
    check_run_directory(tmp_path, resume=True, overwrite=False)  # resuming it: fine
    check_run_directory(tmp_path, resume=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # only the run's entries


def test_an_out_that_is_a_file_is_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "out"
    path.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_run_directory(path, resume=False, overwrite=True)
    with pytest.raises(ValueError, match="give one of them"):
        check_run_directory(tmp_path / "run", resume=True, overwrite=True)


def test_metrics_lines_and_a_resume_drops_the_steps_after_the_checkpoint(tmp_path: Path) -> None:
    with MetricsLog(tmp_path, enabled=True, tensorboard=False) as log:
        for step in (1, 2, 3):
            log.write({"step": step, "loss": 1.0 / step, "mfu": None})
        log.write({"step": 3, "validation_loss": math.inf})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 3]
    assert lines[0] == {"step": 1, "loss": 1.0, "mfu": None}
    assert lines[3]["validation_loss"] is None  # JSON has no inf
    with MetricsLog(tmp_path, enabled=True, tensorboard=False, resume_step=2) as log:
        log.write({"step": 3, "loss": 0.5})
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    MetricsLog(tmp_path / "other", enabled=False, tensorboard=True).write({"step": 1})
    assert not (tmp_path / "other").exists()  # ranks other than 0 write nothing


def test_mfu_peak_perplexity_and_memory() -> None:
    assert peak_flops(torch.device("cpu"), bf16=True, override_tflops=None) is None
    assert peak_flops(torch.device("cpu"), bf16=False, override_tflops=2.5) == 2.5e12
    assert perplexity(math.log(7.0)) == pytest.approx(7.0) and perplexity(1e4) == math.inf
    assert memory_gib(torch.device("cpu")) > 0.0


def test_tensorboard_events_or_a_clear_error(tmp_path: Path) -> None:
    try:
        import tensorboard  # noqa: F401  # pyright: ignore[reportMissingImports, reportUnusedImport]
    except ImportError:
        with pytest.raises(ImportError, match="pip install tensorboard"):
            MetricsLog(tmp_path, enabled=True, tensorboard=True)
        return
    with MetricsLog(tmp_path, enabled=True, tensorboard=True) as log:
        log.write({"step": 1, "loss": 2.0, "validation_loss": 2.5})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
