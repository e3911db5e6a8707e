"""Training progress on the terminal: a rich progress bar, or plain lines when not a TTY."""

from __future__ import annotations

import math
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["TrainProgress", "format_step", "format_validation"]


def format_validation(loss: float, bytes_per_token: float) -> str:
    """`val 1.2000 (ppl 3.32, 1.731 bits/byte)`: the loss, its perplexity and bits per byte."""
    perplexity = math.exp(loss) if loss < 700.0 else math.inf
    bits_per_byte = loss / math.log(2.0) / bytes_per_token
    return f"val {loss:.4f} (ppl {perplexity:.2f}, {bits_per_byte:.3f} bits/byte)"


def format_step(step: int, total: int, loss: float, lr: float, tokens_per_second: float,
                validation_loss: float | None = None, aux_loss: float | None = None, *,
                mfu: float | None = None, bytes_per_token: float = 1.0) -> str:
    """One log line: `step 10/300  loss 3.1416  lr 1.00e-03  12,345 tok/s  MFU 41.0%  val ...`
    (MFU when the device's peak is known); a mixture-of-experts model adds its auxiliary
    losses after the loss (`aux 0.0123`)."""
    aux = "" if aux_loss is None else f"  aux {aux_loss:.4f}"
    line = (f"step {step:>{len(str(total))}}/{total}  loss {loss:.4f}{aux}  lr {lr:.2e}  "
            f"{tokens_per_second:,.0f} tok/s")
    if mfu is not None:
        line += f"  MFU {mfu:.1%}"
    if validation_loss is not None:
        line += "  " + format_validation(validation_loss, bytes_per_token)
    return line


class TrainProgress:
    """Shows training progress: a live bar when `enabled`, else a printed line per report.

    `silent` shows nothing at all (the ranks other than 0 of a multi-process run).
    """

    def __init__(self, *, total: int, completed: int = 0, enabled: bool,
                 console: Console | None = None, silent: bool = False,
                 bytes_per_token: float = 1.0) -> None:
        self.total = total
        self.bytes_per_token = bytes_per_token  # for bits per byte
        self.silent = silent
        self.enabled = enabled and not silent
        self.console = console if console is not None else Console()
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._completed = completed

    def __enter__(self) -> TrainProgress:
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
                TextColumn("{task.fields[rate]} tok/s"), TextColumn("MFU {task.fields[mfu]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(), console=self.console)
            self._progress.start()
            self._task = self._progress.add_task("train", total=self.total,
                                                 completed=self._completed, loss="-", lr="-",
                                                 rate="-", mfu="-")
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def note(self, message: str) -> None:
        """A line of text above the bar (or on its own when the bar is off)."""
        if self.silent:
            return
        if self._progress is not None:
            self._progress.console.print(message, markup=False, highlight=False)
        else:
            print(message, flush=True)

    def advance(self, step: int, loss: float, lr: float, tokens_per_second: float,
                aux_loss: float | None = None, *, mfu: float | None = None) -> None:
        """Move the bar to `step` (prints nothing without a bar)."""
        if self._progress is not None and self._task is not None:
            shown = f"{loss:.4f}" if aux_loss is None else f"{loss:.4f} aux {aux_loss:.4f}"
            self._progress.update(self._task, completed=step, loss=shown,
                                  lr=f"{lr:.2e}", rate=f"{tokens_per_second:,.0f}",
                                  mfu="-" if mfu is None else f"{mfu:.1%}")

    def report(self, step: int, loss: float, lr: float, tokens_per_second: float,
               validation_loss: float | None, aux_loss: float | None = None, *,
               mfu: float | None = None) -> None:
        """Move the bar, or print a line when there is no bar; validation shows either way."""
        if self.silent:
            return
        if self._progress is None:
            print(format_step(step, self.total, loss, lr, tokens_per_second, validation_loss,
                              aux_loss, mfu=mfu, bytes_per_token=self.bytes_per_token),
                  flush=True)
            return
        self.advance(step, loss, lr, tokens_per_second, aux_loss, mfu=mfu)
        if validation_loss is not None:
            self.validation(step, validation_loss)

    def validation(self, step: int, loss: float) -> None:
        """`step 100: validation loss 1.2000 (ppl 3.32, 1.731 bits/byte)` above the bar."""
        self.note(f"step {step}: validation loss "
                  f"{format_validation(loss, self.bytes_per_token)[len('val '):]}")
