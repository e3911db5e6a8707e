"""Run a test function on several local processes joined in a gloo process group.

Usage (the function must be defined at module level so spawned processes can import it):

    def _check(rank: int, world_size: int, size: int) -> None:
        group = ProcessGroups.from_torchrun(tp=world_size).tp
        ...  # asserts; an exception fails the test with this rank's traceback

    def test_something() -> None:
        run_distributed(_check, 2, 16)
"""

from __future__ import annotations

import multiprocessing.context
import multiprocessing.queues
import os
import queue
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_distributed"]

_GRACE_S = 10.0  # after one rank fails, how long the others get to report before being killed


# A result: (rank, traceback or None, whether the process group was up when it ended).
_Result = tuple[int, "str | None", bool]


def _worker(fn: Callable[..., object], rank: int, world_size: int, init_file: str,
            results: multiprocessing.queues.Queue[_Result], args: tuple[object, ...],
            timeout_s: float, backend: str) -> None:
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # never depend on the host name resolving
    torch.set_num_threads(1)  # the ranks share the machine's cores
    group_up = False
    try:
        # NCCL's group is bound to the rank's GPU (barrier uses it, without torch's warning).
        gpu = torch.device("cuda", rank % torch.cuda.device_count()) if backend == "nccl" else None
        if gpu is not None:
            torch.cuda.set_device(gpu)
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s),
                                device_id=gpu)
        # Every rank's connections are up before any rank moves on: otherwise a rank whose
        # function returns at once can close its sockets while a peer is still connecting
        # ("Gloo connectFullMesh failed ... Connection closed by peer").
        dist.barrier()
        group_up = True
        try:
            fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
    except BaseException:  # report everything, including assertion failures and SystemExit
        _report_and_exit(results, (rank, traceback.format_exc(), group_up))
    _report_and_exit(results, (rank, None, True))


def _report_and_exit(results: multiprocessing.queues.Queue[_Result], result: _Result) -> None:
    results.put(result)
    results.close()
    results.join_thread()  # the result is in the pipe
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown, which takes seconds with torch loaded


def _context() -> multiprocessing.context.BaseContext:
    """A fork server that has imported torch once (cheap per-test processes), else spawn."""
    if "forkserver" in mp.get_all_start_methods():
        context = mp.get_context("forkserver")
        context.set_forkserver_preload(
            ["torch", "torch.distributed", "protoformer.parallel", "pytest", __name__])
        return context
    return mp.get_context("spawn")


def run_distributed(fn: Callable[..., object], world_size: int, *args: object,
                    timeout_s: float = 120, backend: str = "gloo") -> None:
    """Run `fn(rank, world_size, *args)` on `world_size` spawned processes, one world group.

    `backend` is "gloo" (CPU tensors) or "nccl" (rank `r` uses CUDA device `r % count`).

    `torch.distributed` is initialised (file store in a temporary directory) before `fn` runs
    and destroyed after. `fn` and `args` must be picklable. Raises `RuntimeError` with the
    traceback of the first rank that failed (then of the others), or `TimeoutError` naming the
    ranks still running after `timeout_s` seconds; stray processes are killed either way.
    A run in which a rank failed before the process group was up (a transient loopback
    connection failure; `fn` had not started anywhere) is retried once with a fresh group.
    """
    failures, missing = _run_once(fn, world_size, args, timeout_s, backend)
    if failures and any(not group_up for _, _, group_up in failures):
        first = failures
        failures, missing = _run_once(fn, world_size, args, timeout_s, backend)
        if failures:
            failures = failures + [(rank, f"(first attempt) {error}", up)
                                   for rank, error, up in first]
    if failures:
        report = "\n".join(f"--- rank {rank} ---\n{error}" for rank, error, _ in failures)
        raise RuntimeError(f"{fn.__qualname__} failed on rank {failures[0][0]} "
                           f"(world size {world_size}):\n{report}")
    if missing:
        raise TimeoutError(f"{fn.__qualname__}: ranks {missing} still running after "
                           f"{timeout_s} s (a collective that not every rank joined?)")


def _run_once(fn: Callable[..., object], world_size: int, args: tuple[object, ...],
              timeout_s: float, backend: str) -> tuple[list[tuple[int, str, bool]], list[int]]:
    """One attempt: (failures as (rank, traceback, group was up), ranks that did not finish)."""
    context = _context()
    results = context.Queue()
    workdir = tempfile.mkdtemp(prefix="protoformer-dist-")
    init_file = os.path.join(workdir, "store")
    processes = [
        context.Process(target=_worker, name=f"rank{rank}", daemon=True,
                        args=(fn, rank, world_size, init_file, results, args, timeout_s, backend))
        for rank in range(world_size)
    ]
    failures: list[tuple[int, str, bool]] = []
    done: set[int] = set()
    try:
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout_s
        while len(done) < world_size:
            now = time.monotonic()
            if now > deadline:
                break
            if failures:
                deadline = min(deadline, now + _GRACE_S)
            try:
                rank, error, group_up = results.get(timeout=0.05)
            except queue.Empty:
                for rank, process in enumerate(processes):
                    if rank not in done and not process.is_alive() and process.exitcode not in (0, None):
                        done.add(rank)
                        failures.append((rank, f"process exited with code {process.exitcode} "
                                               "without reporting (crashed?)", True))
                continue
            done.add(rank)
            if error is not None:
                failures.append((rank, error, group_up))
        for process in processes:
            process.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        results.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return failures, sorted(set(range(world_size)) - done)
