"""What a run records per log step: `metrics.jsonl` in the run directory, optionally TensorBoard.

One JSON object per line, per log step (and per validation):

    {"step": 50, "loss": 2.31, "lr": 0.003, "grad_norm": 0.84, "tokens_per_second": 5210.0,
     "mfu": 0.41, "memory_gib": 1.2, "elapsed_seconds": 61.3,
     "validation_loss": 2.40, "validation_perplexity": 11.0, "validation_bits_per_byte": 3.46}

`mfu` (model FLOPs utilisation) is `protoformer.flops.flops_per_token` x tokens/s over the
device's peak: known for the GPUs in `PEAK_TFLOPS` (dense bf16 / fp32), or given with
`--peak-tflops`; null when unknown (e.g. a CPU). `memory_gib` is the peak CUDA memory
allocated, or the process's peak resident set on the CPU. A resumed run keeps the lines up
to its checkpoint's step and appends after them, so the file never holds a step twice.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import TracebackType
from typing import Protocol, TextIO

import torch

__all__ = ["METRICS_FILE", "PEAK_TFLOPS", "TENSORBOARD_DIR", "MetricsLog", "memory_gib",
           "peak_flops", "perplexity"]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    # device-name fragment: (dense bf16, fp32) TFLOP/s per GPU, from the vendors' data sheets
    "H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5),
    "L40S": (362.0, 91.6), "A10G": (70.0, 31.2), "L4": (121.0, 30.3),
}


def peak_flops(device: torch.device, *, bf16: bool, override_tflops: float | None) -> float | None:
    """The device's peak FLOP/s for MFU: `override_tflops`, else a known GPU's, else None."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, (bf16_peak, fp32_peak) in PEAK_TFLOPS.items():
        if fragment in name:
            return (bf16_peak if bf16 else fp32_peak) * 1e12
    return None


def memory_gib(device: torch.device) -> float:
    """Peak memory so far: CUDA memory allocated on a GPU, the process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
    except ImportError:  # not on POSIX
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def perplexity(loss: float) -> float:
    """exp(loss), inf past float range."""
    return math.exp(loss) if loss < 700.0 else math.inf


class _ScalarWriter(Protocol):
    """The part of TensorBoard's `SummaryWriter` used here."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def _tensorboard_writer(directory: Path) -> _ScalarWriter:
    try:
        from torch.utils.tensorboard.writer import SummaryWriter
    except ImportError:
        raise ImportError("--tensorboard needs the tensorboard package; install it with "
                          "`pip install tensorboard` (or protoformer[tensorboard]), or drop "
                          "--tensorboard (metrics.jsonl is written either way)") from None
    writer: _ScalarWriter = SummaryWriter(log_dir=str(directory))
    return writer


class MetricsLog:
    """Appends one JSON line per `write` to `out_dir/metrics.jsonl` (and TensorBoard scalars).

    `enabled=False` (ranks other than 0) writes nothing. `resume_step` keeps the lines of
    steps up to it and drops later ones (written after the checkpoint by a run that died).
    """

    def __init__(self, out_dir: Path, *, enabled: bool, tensorboard: bool,
                 resume_step: int | None = None) -> None:
        self.path = out_dir / METRICS_FILE
        self.enabled = enabled
        self._file: TextIO | None = None
        self._board: _ScalarWriter | None = None
        if not enabled:
            return
        board = _tensorboard_writer(out_dir / TENSORBOARD_DIR) if tensorboard else None
        out_dir.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    step = json.loads(line).get("step")
                except (ValueError, AttributeError):
                    continue  # a line cut short by a crash
                if isinstance(step, int) and step <= resume_step:
                    kept.append(line)
        self._file = self.path.open("w", encoding="utf-8")
        self._file.writelines(line + "\n" for line in kept)
        self._file.flush()
        self._board = board

    def write(self, record: dict[str, float | int | None]) -> None:
        """One line; None values are written as null (and skipped in TensorBoard)."""
        if self._file is None:
            return
        clean = {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
                 for key, value in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        step = record.get("step")
        if self._board is not None and isinstance(step, int):
            for key, value in clean.items():
                if key != "step" and value is not None:
                    self._board.add_scalar(f"train/{key}" if not key.startswith("validation")
                                           else f"validation/{key[len('validation_'):]}",
                                           float(value), step)
            self._board.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._board is not None:
            self._board.close()
            self._board = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
