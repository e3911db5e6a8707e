"""`protoformer train` under torchrun (2 CPU processes, gloo): the tensor- or data-parallel run
computes the single-process losses, only rank 0 logs, sharded checkpoints resume exactly, and
one rank's failure ends the whole job with that rank's message.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from protoformer.cli import main
from protoformer.recipes import get_preset
from protoformer.train.checkpoint import (
    CHECKPOINTS_DIR,
    LATEST_FILE,
    STATE_FILE,
    CheckpointError,
    load_checkpoint,
)
from protoformer.train.loop import FAULT_INJECTION_VARIABLE, TrainOptions, train
from tests.distributed.tp_testkit import BACKEND

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(BACKEND != "gloo",
                                reason="CPU launch tests (gloo); the GPU script trains itself")

STEPS = 4
ARGS = ["--preset", "tiny", "--device", "cpu", "--steps", str(STEPS), "--batch-size", "4",
        "--seq-len", "32", "--eval-every", "2", "--save-every", "2", "--log-every", "1",
        "--warmup-steps", "2", "--no-sample"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    sources = sorted((REPO / "src" / "protoformer").rglob("*.py"))
    path.write_text("".join(p.read_text(encoding="utf-8") for p in sources)[:120_000],
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def single_process_run(corpus: Path, tmp_path_factory: pytest.TempPathFactory
                       ) -> tuple[list[list[float]], Path]:
    out = tmp_path_factory.mktemp("single")
    result = train(TrainOptions(preset="tiny", device="cpu", steps=STEPS, batch_size=4,
                                seq_len=32, eval_every=2, save_every=2, log_every=1,
                                warmup_steps=2, data=corpus, out_dir=out, progress=False))
    return [[float(step), loss] for step, loss in result.train_losses], out


@pytest.fixture(scope="module")
def single_process_history(single_process_run: tuple[list[list[float]], Path]
                           ) -> list[list[float]]:
    return single_process_run[0]


def short_run(preset: str, **settings: object) -> tuple[list[str], TrainOptions]:
    """The command-line flags (without `--data`/`--out`) and the equal `TrainOptions` of a short
    CPU run of `preset`: `STEPS` steps of 4 sequences of 32 bytes, saving every 2 steps, logging
    every step; `settings` adds or replaces TrainOptions fields (e.g. micro_batch_size=1)."""
    values: dict[str, object] = {"preset": preset, "device": "cpu", "steps": STEPS,
                                 "batch_size": 4, "seq_len": 32, "save_every": 2,
                                 "log_every": 1, "warmup_steps": 2, **settings}
    args = [item for name, value in values.items()
            for item in (f"--{name.replace('_', '-')}", str(value))]
    return [*args, "--no-sample"], TrainOptions(**values, progress=False)  # type: ignore[arg-type]


def torchrun(nproc: int, *args: str, env: dict[str, str] | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    environ = dict(os.environ)
    environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), environ.get("PYTHONPATH", "")])
    environ["OMP_NUM_THREADS"] = "1"
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc-per-node={nproc}", "-m", "protoformer.cli", "train", *args],
        env=environ, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def history(run_dir: Path, step: int) -> list[list[float]]:
    state = json.loads((run_dir / CHECKPOINTS_DIR / f"step_{step:06d}" / STATE_FILE).read_text())
    return [[float(s), float(v)] for s, v in state["history"]["train"]]


def assert_losses_close(actual: list[list[float]], expected: list[list[float]], *,
                        tolerance: float) -> None:
    assert [s for s, _ in actual] == [s for s, _ in expected]
    for (step, got), (_, want) in zip(actual, expected, strict=True):
        assert abs(got - want) <= tolerance, f"step {step:.0f}: loss {got} vs {want}"


@pytest.mark.slow  # two torchrun launches
def test_tensor_parallel_training_matches_one_process_and_resumes_exactly(
        corpus: Path, single_process_run: tuple[list[list[float]], Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    single_process_history, single_dir = single_process_run
    run_dir = tmp_path / "tp2"
    finished = torchrun(2, *ARGS, "--tp", "2", "--data", str(corpus), "--out", str(run_dir))
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output
    # Rank 0 alone logs: each step line appears once.
    assert finished.stdout.count(f"step {STEPS}/{STEPS}") == 1, output
    assert "tensor-parallel 2 x data-parallel 1" in finished.stdout, output
    assert (run_dir / "loss_curve.png").is_file()
    final = run_dir / CHECKPOINTS_DIR / f"step_{STEPS:06d}"
    assert sorted(p.name for p in final.glob("*.safetensors")) == [
        "model.tp00-of-02.safetensors", "model.tp01-of-02.safetensors",
        "optimizer.tp00-of-02.safetensors", "optimizer.tp01-of-02.safetensors"]
    uninterrupted = history(run_dir, STEPS)
    assert_losses_close(uninterrupted, single_process_history, tolerance=1e-5)
    # One process loads the weights by merging the shards: the model of the single-process
    # run, up to the float rounding of the split computation.
    merged, single = get_preset("tiny").build_model(), get_preset("tiny").build_model()
    load_checkpoint(final, merged)
    load_checkpoint(single_dir / CHECKPOINTS_DIR / f"step_{STEPS:06d}", single)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), single(ids), atol=1e-3, rtol=1e-3)
    with pytest.raises(CheckpointError, match="tensor parallelism over 2 ranks"):
        # Resuming on one process needs the optimizer state of the same split.
        load_checkpoint(final, merged, torch.optim.AdamW(merged.parameters()))
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "def ",
                 "--max-new-tokens", "8", "--greedy", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("def ")

    # Resume from the step-2 checkpoint: steps 3 and 4 repeat exactly.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed_dir)
    (resumed_dir / CHECKPOINTS_DIR / LATEST_FILE).write_text("step_000002\n")
    shutil.rmtree(resumed_dir / CHECKPOINTS_DIR / f"step_{STEPS:06d}")
    finished = torchrun(2, "--resume", "--out", str(resumed_dir), "--no-sample")
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output
    assert "resumed from" in finished.stdout, output
    assert history(resumed_dir, STEPS) == uninterrupted


@pytest.mark.slow  # one torchrun launch
def test_data_parallel_training_matches_one_process(
        corpus: Path, single_process_history: list[list[float]], tmp_path: Path) -> None:
    run_dir = tmp_path / "dp2"
    finished = torchrun(2, *ARGS, "--tp", "1", "--data", str(corpus), "--out", str(run_dir))
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output
    assert "tensor-parallel 1 x data-parallel 2" in finished.stdout, output
    # One replica's files in the single-process format (loadable without torchrun).
    final = run_dir / CHECKPOINTS_DIR / f"step_{STEPS:06d}"
    assert sorted(p.name for p in final.glob("*.safetensors")) == [
        "model.safetensors", "optimizer.safetensors"]
    assert_losses_close(history(run_dir, STEPS), single_process_history, tolerance=1e-5)


def test_a_failing_rank_ends_the_training_job_with_its_message(corpus: Path,
                                                                tmp_path: Path) -> None:
    started = time.monotonic()
    finished = torchrun(2, *ARGS, "--tp", "2", "--data", str(corpus), "--out",
                        str(tmp_path / "fails"), "--dist-timeout", "30",
                        env={FAULT_INJECTION_VARIABLE: "rank=1,step=2"}, timeout=90)
    output = finished.stdout + finished.stderr
    assert finished.returncode != 0, output
    assert "[rank 1/2] error: RuntimeError: fault injected on rank 1 at step 2" in output, output
    assert time.monotonic() - started < 75, output


def test_tp_without_torchrun_is_explained(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        train(TrainOptions(preset="tiny", device="cpu", steps=1, tp=2, data=corpus,
                           out_dir=tmp_path, progress=False))
