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
