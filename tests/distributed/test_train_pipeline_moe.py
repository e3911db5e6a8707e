"""`protoformer train --preset tiny-moe --pp 2` under torchrun (2 CPU processes, gloo): the
mixture-of-experts preset (dense layer 0, MoE layers 1-3) trains over two pipeline stages with
the single-process losses and auxiliary losses (metrics.jsonl, 1e-5), shows the aux loss in
the progress line, and resumes exactly from its sharded checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

from protoformer.train.checkpoint import CHECKPOINTS_DIR, LATEST_FILE
from protoformer.train.loop import train
from protoformer.train.metrics import METRICS_FILE
from tests.distributed.test_train_torchrun import (
    assert_losses_close,
    corpus,  # noqa: F401  # the fixture
    history,
    short_run,
    torchrun,
)
from tests.distributed.tp_testkit import BACKEND

pytestmark = pytest.mark.skipif(BACKEND != "gloo",
                                reason="CPU launch tests (gloo); the GPU script trains itself")

STEPS = 4
ARGS, OPTIONS = short_run("tiny-moe", micro_batch_size=1)


def aux_losses(run_dir: Path) -> list[list[float]]:
    lines = (run_dir / METRICS_FILE).read_text().splitlines()
    return [[float(r["step"]), float(r["aux_loss"])] for r in map(json.loads, lines)
            if "aux_loss" in r]


@pytest.mark.slow  # one process, then two torchrun launches
def test_moe_pipeline_training_matches_one_process_and_resumes_exactly(
        corpus: Path, tmp_path: Path) -> None:  # noqa: F811
    single_dir = tmp_path / "single"
    single = train(dataclasses.replace(OPTIONS, data=corpus, out_dir=single_dir))
    expected = [[float(step), loss] for step, loss in single.train_losses]
    expected_aux = aux_losses(single_dir)
    assert len(expected_aux) == STEPS and all(v > 0 for _, v in expected_aux)

    run_dir = tmp_path / "pp2"
    finished = torchrun(2, *ARGS, "--pp", "2", "--data", str(corpus), "--out", str(run_dir),
                        timeout=180)
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output
    assert "x pipeline-parallel 2 (1F1B, 4 micro-batches)" in finished.stdout, output
    assert re.search(rf"step {STEPS}/{STEPS}  loss \d+\.\d{{4}}  aux \d+\.\d{{4}}",
                     finished.stdout), output
    uninterrupted = history(run_dir, STEPS)
    assert_losses_close(uninterrupted, expected, tolerance=1e-5)
    assert_losses_close(aux_losses(run_dir), expected_aux, tolerance=1e-5)

    # Resume from the step-2 checkpoint (weights, AdamW state, expert biases): steps 3 and 4
    # repeat exactly.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed_dir)
    (resumed_dir / CHECKPOINTS_DIR / LATEST_FILE).write_text("step_000002\n")
    shutil.rmtree(resumed_dir / CHECKPOINTS_DIR / f"step_{STEPS:06d}")
    finished = torchrun(2, "--resume", "--out", str(resumed_dir), "--no-sample", timeout=180)
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output
    assert "resumed from" in finished.stdout, output
    assert history(resumed_dir, STEPS) == uninterrupted
