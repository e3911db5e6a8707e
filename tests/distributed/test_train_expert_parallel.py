"""`protoformer train --ep 2` under torchrun (2 CPU processes, gloo) on the tiny MoE preset:
the experts are split over the two ranks, the per-rank checkpoints resume exactly and merge
on one process for `generate`, and one rank's failure ends the whole job with its message.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from protoformer.cli import main
from protoformer.recipes import list_presets
from protoformer.train.checkpoint import CHECKPOINTS_DIR, LATEST_FILE
from protoformer.train.loop import FAULT_INJECTION_VARIABLE
from tests.distributed.test_train_torchrun import corpus, history, torchrun
from tests.distributed.tp_testkit import BACKEND

pytestmark = [
    pytest.mark.skipif(BACKEND != "gloo", reason="CPU launch tests (gloo)"),
    pytest.mark.skipif("tiny-moe" not in list_presets(), reason="needs the tiny-moe preset"),
]
__all__ = ["corpus"]  # the shared corpus fixture

STEPS = 4
ARGS = ["--preset", "tiny-moe", "--device", "cpu", "--steps", str(STEPS), "--batch-size", "4",
        "--seq-len", "32", "--eval-every", "2", "--save-every", "2", "--log-every", "1",
        "--warmup-steps", "2"]


def test_expert_parallel_training_resumes_exactly_and_merges_for_generate(
        corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "ep"
    finished = torchrun(2, *ARGS, "--ep", "2", "--data", str(corpus), "--out", str(run_dir),
                        timeout=240)
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output
    assert finished.stdout.count(f"step {STEPS}/{STEPS}") == 1, output
    assert "experts over 2 expert-parallel ranks" in finished.stdout, output
    assert "sample: skipped" in finished.stdout, output
    final = run_dir / CHECKPOINTS_DIR / f"step_{STEPS:06d}"
    assert sorted(p.name for p in final.glob("model*.safetensors")) == [
        "model.ep00-of-02.safetensors", "model.ep01-of-02.safetensors"]
    uninterrupted = history(run_dir, STEPS)

    # Resume from step 2 (drop the later checkpoint): the same losses to the last digit.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed_dir)
    shutil.rmtree(resumed_dir / CHECKPOINTS_DIR / f"step_{STEPS:06d}")
    (resumed_dir / CHECKPOINTS_DIR / LATEST_FILE).write_text(f"step_{2:06d}\n")
    finished = torchrun(2, "--resume", "--out", str(resumed_dir), "--no-sample", timeout=240)
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output
    assert "resumed from" in finished.stdout, output
    assert history(resumed_dir, STEPS) == uninterrupted

    # One process merges both ranks' experts to generate.
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "def ",
                 "--max-new-tokens", "4", "--greedy", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("def ")


def test_a_failing_expert_parallel_rank_ends_the_job_with_its_message(corpus: Path,
                                                                      tmp_path: Path) -> None:
    started = time.monotonic()
    finished = torchrun(2, *ARGS, "--ep", "2", "--no-sample", "--data", str(corpus), "--out",
                        str(tmp_path / "failing"), "--dist-timeout", "20",
                        env={FAULT_INJECTION_VARIABLE: "rank=1,step=2"}, timeout=120)
    output = finished.stdout + finished.stderr
    assert finished.returncode != 0, output
    assert "[rank 1/2] error: RuntimeError: fault injected on rank 1 at step 2" in output, output
    assert time.monotonic() - started < 110, output


def test_ep_on_one_process_or_a_dense_preset_is_a_one_line_error(
        corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", *ARGS, "--ep", "2", "--data", str(corpus), "--out",
                 str(tmp_path / "one")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--ep 2 splits the model over 2 processes" in err
    assert "torchrun --nproc-per-node 2" in err
    finished = torchrun(2, "--preset", "tiny", "--device", "cpu", "--steps", "1", "--ep", "2",
                        "--data", str(corpus), "--out", str(tmp_path / "dense"), "--no-sample")
    output = finished.stdout + finished.stderr
    assert finished.returncode != 0
    assert "--ep 2 splits the experts of MoE layers, but preset 'tiny' has none" in output, output
