"""`protoformer train --pp 2` under torchrun (2 CPU processes, gloo): the pipelined run computes
the single-process losses (as does one process running the schedule alone), writes a sharded (DCP) checkpoint under the full model's names that
resumes exactly (on the same layout, and on one process), `generate` loads it, and one rank's
failure ends the whole job with that rank's message.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open

from protoformer.cli import main
from protoformer.recipes import get_preset
from protoformer.train.checkpoint import (
    CHECKPOINTS_DIR,
    LATEST_FILE,
    latest_checkpoint,
    load_checkpoint,
)
from protoformer.train.loop import FAULT_INJECTION_VARIABLE, TrainOptions, train
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
# 4 micro-batches of 1 sequence: 1F1B over 2 stages needs at least 2.
ARGS, OPTIONS = short_run("tiny", micro_batch_size=1, eval_every=2)


def test_pipeline_training_matches_one_process_and_resumes_exactly(
        corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    single_dir = tmp_path / "single"
    single = train(dataclasses.replace(OPTIONS, data=corpus, out_dir=single_dir))
    expected = [[float(step), loss] for step, loss in single.train_losses]

    # One process running the Interleaved1F1B schedule over 2 stages of its own (the code path
    # a one-GPU check exercises): the same losses.
    try:
        alone = train(dataclasses.replace(OPTIONS, data=corpus, out_dir=tmp_path / "alone",
                                          pp_schedule="Interleaved1F1B"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert "pipeline schedule on this process alone: pipeline-parallel 1 (Interleaved1F1B, " \
        "2 virtual stages per rank, 4 micro-batches)" in alone.messages
    assert_losses_close([[float(s), v] for s, v in alone.train_losses], expected, tolerance=1e-5)

    run_dir = tmp_path / "pp2"
    finished = torchrun(2, *ARGS, "--pp", "2", "--data", str(corpus), "--out", str(run_dir))
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output
    assert finished.stdout.count(f"step {STEPS}/{STEPS}") == 1, output  # rank 0 alone logs
    assert "x pipeline-parallel 2 (1F1B, 4 micro-batches)" in finished.stdout, output
    final = run_dir / CHECKPOINTS_DIR / f"step_{STEPS:06d}"
    assert (final / "dcp" / ".metadata").is_file()
    uninterrupted = history(run_dir, STEPS)
    assert_losses_close(uninterrupted, expected, tolerance=1e-5)

    # The stages saved their parameters under the full model's names: one process loads the
    # checkpoint whole, and it is the single-process run's model.
    loaded, reference = get_preset("tiny").build_model(), get_preset("tiny").build_model()
    load_checkpoint(final, loaded)
    load_checkpoint(single_dir / CHECKPOINTS_DIR / f"step_{STEPS:06d}", reference)
    for (name, a), b in zip(loaded.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "def ",
                 "--max-new-tokens", "4", "--greedy", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("def ")

    # Resume from the step-2 checkpoint with the same layout: steps 3 and 4 repeat exactly.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed_dir)
    (resumed_dir / CHECKPOINTS_DIR / LATEST_FILE).write_text("step_000002\n")
    shutil.rmtree(resumed_dir / CHECKPOINTS_DIR / f"step_{STEPS:06d}")
    one_process_dir = tmp_path / "resumed-on-one-process"
    shutil.copytree(resumed_dir, one_process_dir)
    finished = torchrun(2, "--resume", "--out", str(resumed_dir), "--no-sample")
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output
    assert "resumed from" in finished.stdout, output
    assert history(resumed_dir, STEPS) == uninterrupted

    # ... and on one process (--pp 1): the same steps, up to the float rounding of the split.
    resumed = train(dataclasses.replace(OPTIONS, data=corpus, out_dir=one_process_dir,
                                        resume=True))
    assert_losses_close([[float(s), v] for s, v in resumed.train_losses], expected,
                        tolerance=1e-5)


def test_tied_embeddings_train_under_pp_and_resume_on_one_process(
        corpus: Path, tmp_path: Path) -> None:  # noqa: F811
    # The last stage holds a copy of the embedding; the checkpoint holds one embedding.weight.
    options = dataclasses.replace(OPTIONS, preset="tiny-tied", data=corpus)
    single = train(dataclasses.replace(options, out_dir=tmp_path / "single"))
    expected = [[float(step), loss] for step, loss in single.train_losses]
    # First and last stage on this one process: the output layer reads the embedding itself.
    try:
        alone = train(dataclasses.replace(options, out_dir=tmp_path / "alone",
                                          pp_schedule="Interleaved1F1B"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert_losses_close([[float(s), v] for s, v in alone.train_losses], expected, tolerance=1e-5)
    run_dir = tmp_path / "pp2"
    args = [arg if arg != "tiny" else "tiny-tied" for arg in ARGS]
    finished = torchrun(2, *args, "--pp", "2", "--data", str(corpus), "--out", str(run_dir))
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output
    uninterrupted = history(run_dir, STEPS)
    assert_losses_close(uninterrupted, expected, tolerance=1e-5)

    exported = tmp_path / "exported"
    assert main(["export", str(run_dir), "--format", "safetensors", "--out", str(exported)]) == 0
    exported_step = latest_checkpoint(exported)
    assert exported_step is not None
    with safe_open(str(exported_step / "model.safetensors"), "pt") as weights:
        names = set(weights.keys())
    assert "embedding.weight" in names and "output_layer.weight" not in names, sorted(names)

    # Resume the step-2 checkpoint on one process: steps 3 and 4 are the uninterrupted ones.
    (run_dir / CHECKPOINTS_DIR / LATEST_FILE).write_text("step_000002\n")
    shutil.rmtree(run_dir / CHECKPOINTS_DIR / f"step_{STEPS:06d}")
    resumed = train(dataclasses.replace(options, out_dir=run_dir, resume=True))
    assert [step for step, _ in resumed.train_losses][-2:] == [3, 4]
    assert_losses_close([[float(s), v] for s, v in resumed.train_losses], uninterrupted,
                        tolerance=1e-5)


def test_a_failing_pipeline_rank_ends_the_job_with_its_message(corpus: Path,  # noqa: F811
                                                                tmp_path: Path) -> None:
    started = time.monotonic()
    finished = torchrun(2, *ARGS, "--pp", "2", "--data", str(corpus), "--out",
                        str(tmp_path / "fails"), "--dist-timeout", "30",
                        env={FAULT_INJECTION_VARIABLE: "rank=1,step=2"}, timeout=90)
    output = finished.stdout + finished.stderr
    assert finished.returncode != 0, output
    assert "[rank 1/2] error: RuntimeError: fault injected on rank 1 at step 2" in output, output
    assert time.monotonic() - started < 75, output


def test_unsupported_pipeline_layouts_are_refused_in_one_line(corpus: Path,  # noqa: F811
                                                              tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        train(dataclasses.replace(OPTIONS, pp=2, data=corpus, out_dir=tmp_path))
    # A run checkpointed in the per-rank safetensors format is not resumed by pipeline stages.
    plain = dataclasses.replace(OPTIONS, steps=1, data=corpus, out_dir=tmp_path / "plain")
    train(plain)
    with pytest.raises(ValueError, match="safetensors format, which pipeline stages cannot load"):
        train(dataclasses.replace(plain, steps=2, resume=True, pp_schedule="1F1B"))
    assert not dist.is_initialized()  # refused before any process group
    for options, message in [
            (dict(pp_schedule="1F1B", virtual_pipeline_model_parallel_size=2),
             "needs --pp-schedule Interleaved1F1B"),
            (dict(pp_schedule="GPipe"), "use one of 1F1B, Interleaved1F1B"),
            (dict(ep=2), "--pp cannot be combined with --ep"),
            (dict(init_from_hf=tmp_path), "--pp cannot be combined with --init-from-hf")]:
        with pytest.raises(ValueError, match=message):
            TrainOptions(pp=2, **options)  # type: ignore[arg-type]
