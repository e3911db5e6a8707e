"""Learning-rate schedules: linear warmup, then a decay to a floor (Megatron's decay styles).

`WarmupCosineSchedule` is the default (`--lr-decay-style cosine`); `LRSchedule` adds
`linear`, `constant` and `WSD` (warmup-stable-decay: the peak rate until the last
`wsd_decay_steps`, then a linear fall to the floor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DECAY_STYLES", "LRSchedule", "WarmupCosineSchedule"]

DECAY_STYLES = ("cosine", "linear", "constant", "WSD")


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


@dataclass(frozen=True)
class LRSchedule:
    """Linear warmup to `max_lr`, then `decay_style` down to `min_lr` at step `total_steps - 1`.

    A pure function of the 0-based step, so resuming needs only the step. `cosine` is
    `WarmupCosineSchedule`; `linear` falls in a straight line; `constant` stays at `max_lr`
    after warmup; `WSD` stays at `max_lr` until the last `wsd_decay_steps` steps, then falls
    linearly to `min_lr`.
    """

    max_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    decay_style: str = "cosine"
    wsd_decay_steps: int = 0

    def __post_init__(self) -> None:
        if self.decay_style not in DECAY_STYLES:
            raise ValueError(f"lr_decay_style={self.decay_style!r}: use one of "
                             f"{', '.join(DECAY_STYLES)}")
        WarmupCosineSchedule(self.max_lr, self.min_lr, self.warmup_steps, self.total_steps)
        if self.decay_style == "WSD" and not \
                0 <= self.wsd_decay_steps <= self.total_steps - self.warmup_steps:
            raise ValueError(f"lr_wsd_decay_steps={self.wsd_decay_steps}: WSD decays over the "
                             f"last steps, between 0 and steps - warmup_steps = "
                             f"{self.total_steps - self.warmup_steps}")

    def __call__(self, step: int) -> float:
        """The learning rate for optimizer step `step` (0-based)."""
        if self.decay_style == "cosine":
            return WarmupCosineSchedule(self.max_lr, self.min_lr, self.warmup_steps,
                                        self.total_steps)(step)
        if step < self.warmup_steps:
            return self.max_lr * (step + 1) / self.warmup_steps
        if self.decay_style == "constant":
            return self.max_lr
        last = self.total_steps - 1
        decay_start = (self.warmup_steps if self.decay_style == "linear"
                       else self.total_steps - self.wsd_decay_steps)
        if step < decay_start:
            return self.max_lr
        span = last - decay_start
        progress = 1.0 if span <= 0 else min((step - decay_start) / span, 1.0)
        return self.max_lr + (self.min_lr - self.max_lr) * progress
