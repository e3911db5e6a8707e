"""Probes for the optional kernel libraries, each run once per process.

A fused kernel is used only on a CUDA tensor and only when its library imports; the probes
answer both questions once and cache the answer, so the hot path pays one dictionary lookup.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType

import torch

__all__ = ["import_optional", "liger_available", "triton_available"]


def import_optional(name: str) -> ModuleType:
    """Import the optional module `name` (call only after its probe said True)."""
    return importlib.import_module(name)


@functools.cache
def triton_available() -> bool:
    """True when a CUDA device is present and Triton imports (the kernels here target CUDA)."""
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


@functools.cache
def liger_available() -> bool:
    """True when liger-kernel (`pip install protoformer[liger]`) imports next to Triton and CUDA."""
    if not triton_available():
        return False
    try:
        importlib.import_module("liger_kernel.ops")
    except ImportError:
        return False
    except Exception as error:  # a broken install (version mismatch with torch/triton)
        warnings.warn(f"liger-kernel is installed but failed to import ({error!r}); the fused "
                      "backend falls back to plain PyTorch for RMSNorm, SwiGLU and the fused "
                      "cross-entropy", RuntimeWarning, stacklevel=2)
        return False
    return True
