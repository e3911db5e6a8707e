"""The warmup + cosine learning-rate schedule against its closed form."""

from __future__ import annotations

import math

import pytest

from protoformer.train.schedule import WarmupCosineSchedule


def test_warmup_rises_linearly_then_cosine_decays_to_the_floor() -> None:
    schedule = WarmupCosineSchedule(max_lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=14)
    assert [schedule(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    for step in range(4, 14):
        progress = (step - 4) / 9
        expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        assert schedule(step) == pytest.approx(expected)
    assert schedule(13) == pytest.approx(0.1)
    assert schedule(100) == pytest.approx(0.1)


def test_no_warmup_starts_at_the_peak() -> None:
    schedule = WarmupCosineSchedule(max_lr=2e-3, min_lr=0.0, warmup_steps=0, total_steps=10)
    assert schedule(0) == pytest.approx(2e-3)
    assert schedule(9) == pytest.approx(0.0)


@pytest.mark.parametrize("kwargs", [
    {"max_lr": 0.0, "min_lr": 0.0, "warmup_steps": 0, "total_steps": 10},
    {"max_lr": 1.0, "min_lr": 2.0, "warmup_steps": 0, "total_steps": 10},
    {"max_lr": 1.0, "min_lr": 0.0, "warmup_steps": 11, "total_steps": 10},
    {"max_lr": 1.0, "min_lr": 0.0, "warmup_steps": 0, "total_steps": 0},
])
def test_bad_settings_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        WarmupCosineSchedule(**kwargs)  # type: ignore[arg-type]


def test_linear_constant_and_wsd_decay_styles_follow_their_closed_forms() -> None:
    from protoformer.train.schedule import LRSchedule

    common = {"max_lr": 1.0, "min_lr": 0.1, "warmup_steps": 2, "total_steps": 12}
    linear = LRSchedule(**common, decay_style="linear")  # type: ignore[arg-type]
    constant = LRSchedule(**common, decay_style="constant")  # type: ignore[arg-type]
    wsd = LRSchedule(**common, decay_style="WSD", wsd_decay_steps=4)  # type: ignore[arg-type]
    cosine = LRSchedule(**common)  # type: ignore[arg-type]
    for step in range(12):
        warm = (step + 1) / 2 if step < 2 else None
        assert linear(step) == pytest.approx(warm or 1.0 - 0.9 * (step - 2) / 9)
        assert constant(step) == pytest.approx(warm or 1.0)
        # WSD: the peak until step 12 - 4 = 8, then a straight line to the floor at step 11.
        assert wsd(step) == pytest.approx(warm or (1.0 if step < 8 else 1.0 - 0.9 * (step - 8) / 3))
        assert cosine(step) == WarmupCosineSchedule(1.0, 0.1, 2, 12)(step)
    with pytest.raises(ValueError, match="lr_decay_style"):
        LRSchedule(**common, decay_style="exponential")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lr_wsd_decay_steps"):
        LRSchedule(**common, decay_style="WSD", wsd_decay_steps=11)  # type: ignore[arg-type]
