"""A hung rank ends the whole torchrun job, and user errors under torchrun are one line per rank.

The hung rank stops itself with SIGSTOP (alive, stuck, deaf to SIGTERM): before the watchdog
the other rank waited in DDP's gradient all-reduce forever (the job still ran 224 s later
with --dist-timeout 10) and the stopped rank could be left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from protoformer.train.loop import FAULT_INJECTION_VARIABLE
from protoformer.watchdog import Watchdog
from tests.distributed.tp_testkit import BACKEND

REPO = Path(__file__).resolve().parents[2]
DIST_TIMEOUT_S = 20
# Setup of two tiny ranks on a loaded 2-core machine, the timeout itself, torchrun noticing
# the exit and tearing down: the job must be gone well before this.
JOB_LIMIT_S = 150

ARGS = ["--preset", "tiny", "--device", "cpu", "--steps", "6", "--batch-size", "4",
        "--seq-len", "32", "--eval-every", "100", "--save-every", "100", "--log-every", "1",
        "--no-sample"]


def _processes_with(marker: str) -> list[int]:
    """Live processes whose command line holds `marker` (zombies excluded)."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            status = (entry / "status").read_text()
        except OSError:
            continue
        if marker.encode() in cmdline and "\nState:\tZ" not in status:
            found.append(int(entry.name))
    return found


def _torchrun(nproc: int, args: list[str], env: dict[str, str],
              limit_s: float) -> tuple[int | None, str, float, list[int]]:
    """Run torchrun; returns (exit status or None if it had to be killed, output, seconds,
    processes of this job still alive afterwards). Everything it started is killed at the end."""
    marker = f"harden-{uuid.uuid4().hex}"
    environ = dict(os.environ)
    environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), environ.get("PYTHONPATH", "")])
    environ["OMP_NUM_THREADS"] = "1"
    environ.update(env)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "protoformer.cli", "train", *args,
               "--out", f"/tmp/{marker}"]
    started = time.monotonic()
    process = subprocess.Popen(command, env=environ, cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=limit_s)
        status: int | None = process.returncode
    except subprocess.TimeoutExpired:
        status = None
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
    elapsed = time.monotonic() - started
    time.sleep(1.0)  # let the last process exit be reaped
    left = _processes_with(marker)
    for pid in left:  # never leave our own processes behind, whatever happened
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return status, output, elapsed, left


@pytest.mark.skipif(BACKEND != "gloo", reason="CPU launch test (gloo)")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_stopped_rank_ends_the_job_within_the_timeout_and_leaves_nothing(
        tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(p.read_text() for p in sorted(
        (REPO / "src" / "protoformer" / "train").glob("*.py")))[:60_000])
    status, output, elapsed, left = _torchrun(
        2, [*ARGS, "--data", str(corpus), "--dist-timeout", str(DIST_TIMEOUT_S)],
        {FAULT_INJECTION_VARIABLE: "rank=1,step=2,action=stop"}, JOB_LIMIT_S)
    assert status is not None, f"the job was still running after {JOB_LIMIT_S} s:\n{output}"
    assert status != 0, output
    assert f"error: no progress for {DIST_TIMEOUT_S} s" in output or \
        "error: no progress for" in output, output
    assert left == [], f"processes left behind: {left}\n{output}"
    assert elapsed < JOB_LIMIT_S


@pytest.mark.skipif(BACKEND != "gloo", reason="CPU launch test (gloo)")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_bad_argument_under_torchrun_is_one_line_per_rank(tmp_path: Path) -> None:
    status, output, _, left = _torchrun(2, [*ARGS, "--tp", "3"], {}, 120)
    assert status not in (None, 0), output
    ours = [line for line in output.splitlines() if line.startswith("[rank ")]
    assert sorted(line[:11] for line in ours) == ["[rank 0/2] ", "[rank 1/2] "], output
    assert all("error: --tp 3 must divide the number of processes 2" in line for line in ours)
    # No traceback from our processes (torchrun's own failure summary may follow).
    assert "protoformer/" not in "".join(line for line in output.splitlines()
                                         if line.strip().startswith("File ")), output
    assert left == []


def test_watchdog_fires_after_the_timeout_without_beats() -> None:
    exits: list[int] = []
    fired = threading.Event()

    def record(code: int) -> None:
        exits.append(code)
        fired.set()

    with Watchdog(0.3, rank=1, world_size=2, exit=record, poll_s=0.02) as watchdog:
        for _ in range(10):  # beats keep it quiet
            time.sleep(0.05)
            watchdog.beat("working")
        assert not fired.is_set()
        assert fired.wait(5.0)
    assert exits == [1]


def test_watchdog_kills_its_node_peers_when_it_fires() -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(sleeper.pid, signal.SIGSTOP)  # a stopped peer: only SIGKILL ends it
        done = threading.Event()
        watchdog = Watchdog(0.2, rank=0, world_size=2, peers=[sleeper.pid],
                            exit=lambda code: done.set(), poll_s=0.02)
        watchdog.start()
        assert done.wait(5.0)
        assert sleeper.wait(timeout=10) == -signal.SIGKILL
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
