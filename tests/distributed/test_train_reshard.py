"""`protoformer train` end to end: a torch_dist run saved at TP=2 resumes at PP=2 (torchrun, 2
CPU processes) with the uninterrupted run's next-step loss, and says in one line what does not
carry over."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from protoformer.train.checkpoint import CHECKPOINTS_DIR, LATEST_FILE
from protoformer.train.loop import train
from tests.distributed.test_train_pipeline import ARGS, OPTIONS, STEPS
from tests.distributed.test_train_torchrun import (
    assert_losses_close,
    corpus,  # noqa: F401  # the fixture
    history,
    torchrun,
)
from tests.distributed.tp_testkit import BACKEND

pytestmark = pytest.mark.skipif(BACKEND != "gloo",
                                reason="CPU launch tests (gloo); the GPU script trains itself")


@pytest.mark.slow  # two torchrun launches and a single-process reference
def test_a_tp2_checkpoint_resumes_at_pp2_with_the_same_next_steps(
        corpus: Path, tmp_path: Path) -> None:  # noqa: F811
    single = train(dataclasses.replace(OPTIONS, data=corpus, out_dir=tmp_path / "single"))
    expected = [[float(step), loss] for step, loss in single.train_losses]

    run_dir = tmp_path / "tp2"
    saved = torchrun(2, *ARGS, "--tp", "2", "--ckpt-format", "torch_dist", "--data", str(corpus),
                     "--out", str(run_dir), "--steps", "2")
    assert saved.returncode == 0, saved.stdout + saved.stderr
    assert (run_dir / CHECKPOINTS_DIR / "step_000002" / "dcp" / ".metadata").is_file()
    assert (run_dir / CHECKPOINTS_DIR / LATEST_FILE).read_text().strip() == "step_000002"

    resumed_dir = tmp_path / "pp2"
    shutil.copytree(run_dir, resumed_dir)
    resumed = torchrun(2, *ARGS, "--tp", "1", "--pp", "2", "--data", str(corpus), "--out",
                       str(resumed_dir), "--resume")
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output
    assert "resumed on another layout (saved at tp=2 x dp=1 x pp=1, 2 process(es); now tp=1 x " \
        "dp=1 x pp=2, 2)" in output, output
    assert_losses_close(history(resumed_dir, STEPS), expected, tolerance=1e-5)
