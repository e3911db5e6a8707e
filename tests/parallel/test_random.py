"""RNGStatesTracker and model_parallel_manual_seed on the CPU generator."""

from __future__ import annotations

import pytest
import torch

from protoformer.parallel.random import (
    MODEL_PARALLEL_RNG_TRACKER_NAME,
    RNGStatesTracker,
    get_rng_tracker,
    model_parallel_manual_seed,
    model_parallel_rng_tracker,
)


def draws_in_fork(tracker: RNGStatesTracker, count: int = 4) -> torch.Tensor:
    with tracker.fork():
        return torch.rand(count)


def test_the_model_parallel_stream_differs_per_rank_and_the_default_rng_does_not() -> None:
    per_rank = []
    defaults = []
    for tp_rank in (0, 1):
        tracker = RNGStatesTracker()
        model_parallel_manual_seed(123, tp_rank, tracker=tracker)
        per_rank.append(draws_in_fork(tracker))
        defaults.append(torch.rand(4))
    assert not torch.equal(per_rank[0], per_rank[1])
    assert torch.equal(defaults[0], defaults[1])

    tracker = RNGStatesTracker()
    model_parallel_manual_seed(123, 1, tracker=tracker)
    assert torch.equal(draws_in_fork(tracker), per_rank[1])  # reproducible


def test_fork_leaves_the_default_rng_where_it_was() -> None:
    tracker = RNGStatesTracker()
    model_parallel_manual_seed(7, 0, tracker=tracker)
    expected = torch.rand(3)
    model_parallel_manual_seed(7, 0, tracker=tracker)
    draws_in_fork(tracker, 100)
    assert torch.equal(torch.rand(3), expected)


def test_a_stream_resumes_where_the_last_fork_stopped() -> None:
    tracker = RNGStatesTracker()
    tracker.add("dropout", 42)
    with tracker.fork("dropout"):
        first = torch.rand(2)
    torch.rand(5)  # default-RNG use in between does not disturb the stream
    with tracker.fork("dropout"):
        second = torch.rand(2)
    expected = torch.rand(4, generator=torch.Generator().manual_seed(42))
    assert torch.equal(torch.cat([first, second]), expected)


def test_states_round_trip() -> None:
    tracker = RNGStatesTracker()
    tracker.add("a", 1)
    draws_in_fork_named(tracker, "a")
    saved = tracker.get_states()
    expected = draws_in_fork_named(tracker, "a")
    tracker.set_states(saved)
    assert torch.equal(draws_in_fork_named(tracker, "a"), expected)


def draws_in_fork_named(tracker: RNGStatesTracker, name: str) -> torch.Tensor:
    with tracker.fork(name):
        return torch.rand(3)


def test_misuse_is_reported() -> None:
    tracker = RNGStatesTracker()
    tracker.add("a", 1)
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("a", 2)
    with pytest.raises(ValueError, match="already used"):
        tracker.add("b", 1)
    with pytest.raises(ValueError, match="no stream named 'missing'"):
        with tracker.fork("missing"):
            pass
    with pytest.raises(ValueError, match="seed=-1"):
        model_parallel_manual_seed(-1, 0, tracker=tracker)


def test_the_process_wide_tracker_is_seeded_by_default() -> None:
    assert get_rng_tracker() is model_parallel_rng_tracker
    model_parallel_manual_seed(5, 0)
    assert model_parallel_rng_tracker.names() == [MODEL_PARALLEL_RNG_TRACKER_NAME]


def test_the_tensor_parallel_fork_is_a_no_op_on_one_rank() -> None:
    from protoformer.parallel.random import tensor_parallel_rng_fork

    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    with tensor_parallel_rng_fork(None, tracker=RNGStatesTracker()):  # no stream needed
        drawn = torch.rand(3)
    assert torch.equal(drawn, expected)


def test_checkpoint_context_replays_the_streams_for_the_recompute() -> None:
    from protoformer.parallel.random import checkpoint_rng_context_fn

    tracker = RNGStatesTracker()
    tracker.add("model-parallel-rng", 99)
    forward_context, recompute_context = checkpoint_rng_context_fn(tracker)()
    with forward_context:
        first = draws_in_fork(tracker)
    later = draws_in_fork(tracker)  # the stream moves on (other layers)
    with recompute_context:
        replayed = draws_in_fork(tracker)
    assert torch.equal(replayed, first)
    assert torch.equal(draws_in_fork(tracker), draws_after(99, skip=8, count=4))
    assert not torch.equal(later, first)


def draws_after(seed: int, *, skip: int, count: int) -> torch.Tensor:
    return torch.rand(skip + count, generator=torch.Generator().manual_seed(seed))[skip:]
