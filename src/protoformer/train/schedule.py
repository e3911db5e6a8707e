"""Learning-rate schedule: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["WarmupCosineSchedule"]


@dataclass(frozen=True)
class WarmupCosineSchedule:
    """The learning rate as a pure function of the step, so resuming needs only the step.

    Steps count from 0. During the first `warmup_steps` the rate rises linearly to `max_lr`
    (reaching it at step `warmup_steps - 1`); it then follows half a cosine down to `min_lr`
    at step `total_steps - 1` and stays there.
    """

    max_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    def __post_init__(self) -> None:
        if not self.max_lr > 0.0:
            raise ValueError(f"max_lr={self.max_lr}: the peak learning rate must be > 0")
        if not 0.0 <= self.min_lr <= self.max_lr:
            raise ValueError(f"min_lr={self.min_lr}: must be between 0 and max_lr={self.max_lr}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps={self.total_steps}: must be >= 1")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps}: must be between 0 and "
                             f"total_steps={self.total_steps}")

    def __call__(self, step: int) -> float:
        """The learning rate for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.max_lr * (step + 1) / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps - 1
        if decay_steps <= 0:
            return self.max_lr if step < self.total_steps else self.min_lr
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + (self.max_lr - self.min_lr) * cosine
