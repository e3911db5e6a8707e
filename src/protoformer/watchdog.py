"""A watchdog that ends a multi-process run when it stops making progress.

A collective's own timeout does not bound every hang: NCCL's applies (its watchdog aborts
the communicator), but a gloo collective waiting on a peer that is alive and stuck (stopped
with SIGSTOP, deadlocked, blocked on a filesystem) may wait forever, DDP's gradient
reduction included, and so may any rank that waits on such a rank. So each rank runs a
monitor thread: the training loop reports progress (`beat`) at every step and hook, and when
`timeout_s` seconds pass without a beat the monitor

1. prints `[rank R/W] error: no progress for N s (last: WHAT); ...` to stderr,
2. kills the other ranks of this node with SIGKILL (their process ids were exchanged when the
   watchdog started; SIGKILL also ends a stopped process, which SIGTERM does not), so nothing
   is left behind even when the stuck rank cannot hear torchrun's SIGTERM, and
3. exits this rank with status 1 at once (`os._exit`: no collective, no teardown that would
   wait), which makes torchrun end the job with a non-zero status.

Ranks on other nodes end through their own watchdogs (their peers are gone, so they make no
progress either) or through torchrun. The monitor thread only reads a clock and sleeps; it
needs the GIL, which a rank blocked in a collective or a kernel has released.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType

__all__ = ["Watchdog"]


class Watchdog:
    """Ends this rank (and its node's other ranks) after `timeout_s` seconds without `beat`.

    Use as a context manager around the work to bound; `beat(what)` after each unit of
    progress. `peers` are the process ids of the other ranks on this node (killed when the
    watchdog fires); `exit` ends the process (replaced in tests).
    """

    def __init__(self, timeout_s: float, *, rank: int, world_size: int,
                 peers: Sequence[int] = (), exit: Callable[[int], None] = os._exit,
                 poll_s: float | None = None) -> None:
        if not timeout_s > 0:
            raise ValueError(f"watchdog timeout {timeout_s} s: must be positive")
        self.timeout_s = float(timeout_s)
        self.rank, self.world_size = rank, world_size
        self.peers = tuple(pid for pid in peers if pid != os.getpid())
        self._exit = exit
        self._poll_s = poll_s if poll_s is not None else min(1.0, self.timeout_s / 10)
        self._last = time.monotonic()
        self._what = "start"
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.fired = False

    def beat(self, what: str) -> None:
        """Record progress: `what` was just done (named in the message if nothing follows)."""
        self._last = time.monotonic()
        self._what = what

    def start(self) -> None:
        """Start the monitor thread (a daemon: it never keeps the process alive)."""
        self.beat("start")
        self._thread = threading.Thread(target=self._watch, name="protoformer-watchdog",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop monitoring (the bounded work is done)."""
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(self._poll_s * 5, 1.0))

    def __enter__(self) -> Watchdog:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()

    def _watch(self) -> None:
        while not self._stopped.wait(self._poll_s):
            idle = time.monotonic() - self._last
            if idle >= self.timeout_s:
                self._fire(idle)
                return

    def _fire(self, idle: float) -> None:
        self.fired = True
        where = f"[rank {self.rank}/{self.world_size}]"
        sys.stderr.write(
            f"{where} error: no progress for {idle:.0f} s (--dist-timeout {self.timeout_s:g}; "
            f"last: {self._what}); a rank is stuck or stopped. Ending the job\n")
        sys.stderr.flush()
        for pid in self.peers:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass  # already gone, or not ours to end: torchrun stops it
        self._exit(1)
