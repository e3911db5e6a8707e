"""Running on several processes: the `torchrun` environment, process groups, data parallelism.

A multi-process run is launched by `torchrun`, which starts one process per device and tells
each its place through environment variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, ...).
`init_distributed` reads them, picks the device (`cuda:LOCAL_RANK` or the CPU) and joins the
process group (NCCL on GPUs, gloo on the CPU) with a timeout, so a rank stuck in a collective
raises instead of waiting forever. `ProcessGroups.from_torchrun(tp=...)` then splits the world
into tensor-parallel and data-parallel groups.

Data parallelism is `torch.nn.parallel.DistributedDataParallel` over the data-parallel group
(`wrap_data_parallel`): it averages gradients during backward, overlapping the communication
with the computation, works with gloo on the CPU and NCCL on GPUs on every supported torch, and
leaves the parameters (and their tensor-parallel tags) untouched. FSDP2 (`fully_shard`) is not
used: it replaces each parameter with a DTensor, dropping the tags that
`finalize_model_grads` and the tensor-parallel gradient norm read, and its gloo/CPU support
varies between torch releases. Deferred weight gradients (`config.delay_wgrad_compute`) fill
`.grad` after backward, where DDP's hooks cannot see them: with those, skip the wrapper and
average with `finalize_model_grads(model, pg, reduce_data_parallel=True)` instead.

`fail_fast` turns an exception on one rank into the end of the whole run: the rank prints its
error (with its rank) and exits non-zero at once, without running collectives or destructors
that would wait for the other ranks; `torchrun` then stops the others. A user error (a bad
option, file or spec) is one line per failing rank; other errors keep their traceback, and
`PROTOFORMER_DEBUG=1` (the CLI's `--debug`) shows tracebacks for all. A rank that hangs
instead of raising is ended by `protoformer.watchdog.Watchdog`, which needs the process ids
of the node's other ranks (`local_peer_pids`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import traceback
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from protoformer.parallel.groups import ProcessGroups

__all__ = [
    "DEBUG_VARIABLE",
    "DEFAULT_TIMEOUT_S",
    "LaunchEnvironment",
    "all_gather_objects",
    "barrier",
    "debug_enabled",
    "destroy_distributed",
    "fail_fast",
    "init_distributed",
    "local_peer_pids",
    "resolve_device",
    "wrap_data_parallel",
]

DEFAULT_TIMEOUT_S = 600.0
"""How long a collective may wait for the other ranks before it raises (seconds)."""

DEBUG_VARIABLE = "PROTOFORMER_DEBUG"
"""Set to 1 (or pass the CLI's --debug) to print tracebacks for user errors too."""


def debug_enabled() -> bool:
    """Whether `PROTOFORMER_DEBUG` asks for tracebacks of every error."""
    return os.environ.get(DEBUG_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")

_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "")
_T = TypeVar("_T")

# torch leaves these parameters unannotated; the types they are called with here.
_barrier = cast("Callable[[], object]", dist.barrier)  # pyright: ignore[reportUnknownMemberType]
_all_gather_object = cast("Callable[[list[object], object], None]",
                          dist.all_gather_object)  # pyright: ignore[reportUnknownMemberType]


def barrier() -> None:
    """Wait for every rank of the world group; a no-op without a process group."""
    if dist.is_available() and dist.is_initialized():
        _barrier()


def all_gather_objects(value: _T) -> list[_T]:
    """Every rank's `value` (picklable), in rank order; `[value]` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered: list[object] = [None] * dist.get_world_size()
    _all_gather_object(gathered, value)
    return cast("list[_T]", gathered)


@dataclass(frozen=True)
class LaunchEnvironment:
    """This process's place in a launch: global rank, world size, rank and count on this node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        """Whether several processes take part (a process group is needed)."""
        return self.world_size > 1

    @property
    def is_rank_zero(self) -> bool:
        """Whether this process is global rank 0 (the one that logs and plots)."""
        return self.rank == 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LaunchEnvironment:
        """Read `torchrun`'s variables; without them, a single process (rank 0 of 1)."""
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env and "RANK" not in env:
            return cls()
        world_size = _env_int(env, "WORLD_SIZE", 1, minimum=1)
        rank = _env_int(env, "RANK", 0, minimum=0)
        local_rank = _env_int(env, "LOCAL_RANK", rank, minimum=0)
        local_world_size = _env_int(env, "LOCAL_WORLD_SIZE", world_size, minimum=1)
        if rank >= world_size:
            raise ValueError(f"RANK={rank} must be below WORLD_SIZE={world_size}; launch with "
                             "torchrun, which sets both")
        if local_rank >= local_world_size:
            raise ValueError(f"LOCAL_RANK={local_rank} must be below LOCAL_WORLD_SIZE="
                             f"{local_world_size}")
        return cls(rank=rank, world_size=world_size, local_rank=local_rank,
                   local_world_size=local_world_size)


def _env_int(env: Mapping[str, str], name: str, default: int, *, minimum: int) -> int:
    text = env.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"environment variable {name}={value} must be >= {minimum}")
    return value


def resolve_device(name: str | torch.device, launch: LaunchEnvironment | None = None
                   ) -> torch.device:
    """The device this process computes on.

    `auto` is CUDA when available, else the CPU; a bare `cuda` means this process's own GPU
    (`cuda:LOCAL_RANK`) when launched by torchrun. `cuda` without a GPU is a `ValueError`.
    """
    launch = launch if launch is not None else LaunchEnvironment.from_env()
    text = str(name)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {text!r} requested, but torch sees no CUDA device; use "
                             "--device cpu or auto")
        if text == "cuda":
            count = torch.cuda.device_count()
            if launch.is_distributed and launch.local_rank >= count:
                raise ValueError(f"LOCAL_RANK={launch.local_rank} but this node has {count} "
                                 f"GPU(s); start at most {count} processes per node")
            return torch.device("cuda", launch.local_rank if launch.is_distributed else 0)
    return torch.device(text)


def init_distributed(
    device: str | torch.device = "auto",
    *,
    backend: str | None = None,
    timeout: float | timedelta = DEFAULT_TIMEOUT_S,
) -> tuple[LaunchEnvironment, torch.device]:
    """Join the process group that `torchrun` set up; return the launch and this rank's device.

    A single process (no torchrun variables, or a world of one) gets no process group and
    needs none. Otherwise the backend is NCCL for CUDA devices and gloo for the CPU (or
    `backend`), the CUDA device is made current (and an NCCL group is bound to it), and
    every collective raises after `timeout` seconds instead of hanging (for NCCL, set
    `TORCH_NCCL_ASYNC_ERROR_HANDLING=1`, torch's default, so the watchdog aborts the rank).
    Calling it again reuses the existing group.
    """
    launch = LaunchEnvironment.from_env()
    resolved = resolve_device(device, launch)
    if not launch.is_distributed:
        return launch, resolved
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; a multi-process run "
                           "(WORLD_SIZE > 1) cannot start")
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    chosen = backend if backend is not None else ("nccl" if resolved.type == "cuda" else "gloo")
    if chosen == "nccl" and resolved.type != "cuda":
        raise ValueError(f"backend 'nccl' needs CUDA devices, but this rank runs on {resolved}; "
                         "use --device cuda or the gloo backend")
    if chosen == "gloo" and os.environ.get("MASTER_ADDR", "") in _LOOPBACK_HOSTS \
            and launch.local_world_size == launch.world_size:
        # One node talking to itself: keep gloo on the loopback interface, so that a host
        # name that does not resolve (containers, no network) cannot stop the run.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    limit = timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))
    if limit.total_seconds() <= 0:
        raise ValueError(f"timeout={timeout}: must be positive")
    if not dist.is_initialized():
        if "nccl" in chosen and resolved.type == "cuda":
            # Bound to this rank's GPU: NCCL collectives that take no tensor (barrier) use it
            # instead of guessing from the current device (and warning about it on every run).
            dist.init_process_group(backend=chosen, timeout=limit, device_id=resolved)  # pyright: ignore[reportUnknownMemberType]  # torch leaves `pg_options` unannotated
        else:
            dist.init_process_group(backend=chosen, timeout=limit)  # pyright: ignore[reportUnknownMemberType]  # torch leaves `pg_options` unannotated
    return launch, resolved


def local_peer_pids() -> list[int]:
    """The process ids of the other ranks on this node (a collective: call on every rank).

    Empty without a process group. The watchdog kills these when this rank sees no progress,
    so that a stopped rank, deaf to torchrun's SIGTERM, is not left behind.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return []
    here = socket.gethostname()
    everyone = all_gather_objects((here, os.getpid()))
    return [pid for host, pid in everyone if host == here and pid != os.getpid()]


def destroy_distributed() -> None:
    """Leave the process group (if any). Call on every rank at the end of a successful run."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def fail_fast(launch: LaunchEnvironment | None = None, *,
              user_errors: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError),
              ) -> Generator[None, None, None]:
    """End the whole multi-process run when this rank raises, instead of leaving others hanging.

    In a distributed launch an exception escaping the block is printed to stderr with this
    rank's number, and the process exits with status 1 at once (`os._exit`: no collective,
    no process-group teardown that would wait for the other ranks); torchrun sees the failure
    and stops every other rank. One of `user_errors` (a mistake in what the user gave) is one
    line, `[rank R/W] error: ...`; anything else (a bug) comes with its traceback, as does
    every error when `debug_enabled()`. A single process re-raises as usual.
    """
    launch = launch if launch is not None else LaunchEnvironment.from_env()
    try:
        yield
    except SystemExit as stop:
        if not launch.is_distributed or stop.code in (0, None):
            raise
        _die(launch, f"exited with status {stop.code}", "")
    except BaseException as error:  # KeyboardInterrupt too: the other ranks must stop as well
        if not launch.is_distributed:
            raise
        if isinstance(error, user_errors):
            details = traceback.format_exc() if debug_enabled() else ""
            _die(launch, _one_line(str(error) or type(error).__name__), details)
        _die(launch, f"{type(error).__name__}: {_one_line(str(error))}", traceback.format_exc())


def _one_line(text: str, limit: int = 2000) -> str:
    line = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _die(launch: LaunchEnvironment, message: str, details: str) -> None:
    if details:
        sys.stderr.write(details)
    sys.stderr.write(f"[rank {launch.rank}/{launch.world_size}] error: {message}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)


def wrap_data_parallel(model: nn.Module, pg: ProcessGroups, device: torch.device) -> nn.Module:
    """`DistributedDataParallel` over `pg.dp`; the model itself when there is one replica.

    Gradients are averaged over the data-parallel group during backward, so each replica's
    loss should be the mean over its own share of the global batch. Buffers are not
    broadcast each step (they are derived tables, the same everywhere); the parameters are
    broadcast once from the group's first rank when wrapping.
    """
    if pg.dp_size == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, process_group=pg.dp,
                                   broadcast_buffers=False)
