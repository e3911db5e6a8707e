"""The launch helpers: torchrun's environment, device choice, and failing fast under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from protoformer.distributed import (
    LaunchEnvironment,
    fail_fast,
    init_distributed,
    resolve_device,
    wrap_data_parallel,
)
from protoformer.parallel import ProcessGroups
from tests.distributed.tp_testkit import BACKEND

REPO = Path(__file__).resolve().parents[2]


def test_launch_environment_defaults_to_one_process() -> None:
    launch = LaunchEnvironment.from_env({})
    assert launch == LaunchEnvironment(rank=0, world_size=1, local_rank=0, local_world_size=1)
    assert not launch.is_distributed and launch.is_rank_zero


def test_launch_environment_reads_torchrun_variables() -> None:
    launch = LaunchEnvironment.from_env(
        {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (launch.rank, launch.world_size, launch.local_rank, launch.local_world_size) == (3, 4, 1, 2)
    assert launch.is_distributed and not launch.is_rank_zero


@pytest.mark.parametrize(("environ", "message"), [
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 must be below WORLD_SIZE=2"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be >= 1"),
])
def test_launch_environment_rejects_bad_variables(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LaunchEnvironment.from_env(environ)


def test_single_process_needs_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    launch, device = init_distributed("cpu")
    assert not launch.is_distributed and device == torch.device("cpu")
    assert not (dist.is_available() and dist.is_initialized())
    model = torch.nn.Linear(2, 2)
    assert wrap_data_parallel(model, ProcessGroups(), device) is model


def _fake_torchrun_on_gpus(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """Rank 1 of 2 on a node with 2 (pretended) GPUs; the process-group calls are recorded."""
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                        "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "10.1.2.3"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    calls: list[dict[str, object]] = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    return calls


def test_nccl_group_is_bound_to_the_ranks_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # Bound, torch's barrier() uses that GPU instead of warning "barrier(): using the device
    # under current context" on every run.
    calls = _fake_torchrun_on_gpus(monkeypatch)
    _, device = init_distributed("cuda", timeout=30)
    assert device == torch.device("cuda", 1)
    assert calls == [{"backend": "nccl", "timeout": timedelta(seconds=30),
                      "device_id": torch.device("cuda", 1)}]


def test_gloo_group_is_not_bound_to_a_device(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_torchrun_on_gpus(monkeypatch)
    init_distributed("cpu", timeout=30)
    init_distributed("cuda", backend="gloo", timeout=30)
    assert calls == [{"backend": "gloo", "timeout": timedelta(seconds=30)}] * 2


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


def test_fail_fast_reraises_in_a_single_process() -> None:
    with pytest.raises(KeyError, match="boom"), fail_fast(LaunchEnvironment()):
        raise KeyError("boom")


def torchrun(script: Path, nproc: int, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc-per-node={nproc}", str(script), *args],
        env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


FAILING_SCRIPT = """
    import time
    import torch
    import torch.distributed as dist
    from protoformer.distributed import fail_fast, init_distributed
    from protoformer.parallel import ProcessGroups

    launch, device = init_distributed("cpu", timeout=20)
    with fail_fast(launch):
        pg = ProcessGroups.from_torchrun(tp=2)
        if launch.rank == 1:
            time.sleep(0.5)
            raise ValueError("rank one could not read its shard")
        dist.all_reduce(torch.ones(1))  # rank 0 waits here for a rank that is gone
    print("rank", launch.rank, "finished")
"""


@pytest.mark.skipif(BACKEND != "gloo", reason="CPU launch test (gloo); runs in the CPU suite")
def test_a_failure_on_one_rank_ends_the_whole_torchrun_job(tmp_path: Path) -> None:
    script = tmp_path / "fails_on_rank_one.py"
    script.write_text(textwrap.dedent(FAILING_SCRIPT), encoding="utf-8")
    started = time.monotonic()
    finished = torchrun(script, 2, timeout=90)
    output = finished.stdout + finished.stderr
    assert finished.returncode != 0, output
    # A user error (ValueError) is one line per rank, without our traceback (torchrun still
    # prints its own ChildFailedError report); PROTOFORMER_DEBUG=1 would add ours.
    assert "[rank 1/2] error: rank one could not read its shard" in output, output
    assert 'raise ValueError("rank one' not in output, output
    assert "finished" not in finished.stdout, output
    assert time.monotonic() - started < 60, output
