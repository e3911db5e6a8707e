"""Will a model fit? A memory estimate from the config, compared with the device's free memory.

Building a model allocates every parameter; a config that asks for more than the machine has
(a 70B preset on a laptop, a corrupt config.json) would otherwise allocate until the
operating system kills the process, or fail deep inside torch with a traceback. The estimate
is made from the sizes alone, before anything is allocated:

    parameters = layers * (attention + MLP weights) + vocab * hidden (+ the output layer
                 when not tied) + learned position table, split over tensor-parallel ranks
    bytes      = parameters * bytes per element of `params_dtype`
    training   + gradients (same size) + AdamW's two float32 moments (8 bytes per parameter)

Free memory is `torch.cuda.mem_get_info` on a GPU and `MemAvailable` of /proc/meminfo on the
CPU (psutil's `available` where /proc is absent; no check where neither can be read). The
meta device allocates nothing and is never checked. `PROTOFORMER_SKIP_MEMORY_CHECK=1` turns
the check off (for a machine whose swap the user means to use).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from protoformer.config import TransformerConfig

__all__ = ["MemoryEstimate", "ModelTooLargeError", "available_bytes", "check_fits",
           "estimate_model_memory"]

SKIP_ENV = "PROTOFORMER_SKIP_MEMORY_CHECK"
_ADAM_BYTES_PER_PARAMETER = 8  # exp_avg and exp_avg_sq, float32


class ModelTooLargeError(ValueError):
    """The model a config describes does not fit in the device's free memory."""


@dataclass(frozen=True)
class MemoryEstimate:
    """What a model needs on one device (one tensor-parallel rank), in parameters and bytes."""

    parameters: int
    bytes: int
    training: bool

    def describe(self) -> str:
        """E.g. "70.6 B parameters, 1.13 TB with gradients and AdamW state"."""
        what = " with gradients and AdamW state" if self.training else ""
        return f"{_count(self.parameters)} parameters, {_bytes(self.bytes)}{what}"


def estimate_model_memory(config: TransformerConfig, vocab_size: int, *,
                          tied_embeddings: bool = False, max_sequence_length: int = 0,
                          learned_positions: bool = False, tp_size: int = 1,
                          training: bool = False) -> MemoryEstimate:
    """The parameters and bytes a decoder-only model of `config` needs on one rank.

    Norm weights and biases (a few vectors per layer) are left out; the estimate is within a
    few percent for every preset.
    """
    linears = 3 if config.gated_linear_unit else 2
    per_layer = config.attention_matmul_params + linears * config.hidden_size * config.ffn_size
    embedding = vocab_size * config.hidden_size
    parameters = config.num_layers * per_layer + embedding * (1 if tied_embeddings else 2)
    if learned_positions:
        parameters += max_sequence_length * config.hidden_size
    parameters = -(-parameters // max(tp_size, 1))
    element = torch.empty((), dtype=config.params_dtype, device="meta").element_size()
    per_parameter = 2 * element + _ADAM_BYTES_PER_PARAMETER if training else element
    return MemoryEstimate(parameters, parameters * per_parameter, training)


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device` in bytes, or None when it cannot be told (or is not checked)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    meminfo = Path("/proc/meminfo")
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        psutil = importlib.import_module("psutil")
    except ImportError:
        return None
    available: int = psutil.virtual_memory().available
    return available


def check_fits(estimate: MemoryEstimate, device: torch.device | str | None, *, what: str,
               hint: str = "") -> None:
    """`ModelTooLargeError` (one line: the estimate, the free memory, a way out) unless it fits."""
    placement = torch.device(device) if device is not None else torch.get_default_device()
    if placement.type == "meta" or os.environ.get(SKIP_ENV, "") not in ("", "0"):
        return
    free = available_bytes(placement)
    if free is None or estimate.bytes <= free:
        return
    way_out = hint or "use a smaller model, more tensor-parallel ranks or a larger device"
    raise ModelTooLargeError(
        f"{what} needs about {estimate.describe()}, but {placement} has {_bytes(free)} free; "
        f"{way_out} (set {SKIP_ENV}=1 to try anyway)")


def _count(value: int) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return str(value)


def _bytes(value: int) -> str:
    for scale, unit in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value} bytes"
