"""Named random-number streams, for dropout that must differ across tensor-parallel ranks.

Two kinds of randomness live in a tensor-parallel model. The *default* RNG is seeded the same
on every tensor-parallel rank, so replicated work (weight initialisation, dropout on
replicated activations) gives the same numbers everywhere. Inside a tensor-parallel region each
rank holds a different slice of the activations, so dropout there must draw *different*
numbers per rank: `model_parallel_rng_tracker.fork()` swaps in a stream seeded per rank for the
duration of a `with` block, then puts the default state back, and the stream resumes where it
stopped at the next `fork()`.

Device-agnostic: a stream covers the CPU generator and, once CUDA is initialised, the current
CUDA device's generator (the one dropout on that device draws from).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator
from contextlib import AbstractContextManager

import torch
from torch import Tensor

from protoformer.parallel.groups import ProcessGroup, group_size

__all__ = [
    "MODEL_PARALLEL_RNG_TRACKER_NAME",
    "RNGStatesTracker",
    "checkpoint_rng_context_fn",
    "get_rng_tracker",
    "manual_seed_within",
    "model_parallel_manual_seed",
    "model_parallel_rng_tracker",
    "tensor_parallel_rng_fork",
]

MODEL_PARALLEL_RNG_TRACKER_NAME = "model-parallel-rng"
"""The stream that differs per tensor-parallel rank (Megatron-Core's name)."""

_MODEL_PARALLEL_SEED_OFFSET = 2718  # Megatron-Core's offset: keeps the stream off the default seed


def _active_devices() -> list[str]:
    """The generators a fork swaps: the CPU's, and the current CUDA device's once CUDA is up."""
    devices = ["cpu"]
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        devices.append(f"cuda:{torch.cuda.current_device()}")
    return devices


def _get_state(device: str) -> Tensor:
    if device == "cpu":
        return torch.get_rng_state()
    return torch.cuda.get_rng_state(device)


def _set_state(device: str, state: Tensor) -> None:
    if device == "cpu":
        torch.set_rng_state(state)
    else:
        torch.cuda.set_rng_state(state, device)


def _require_seed(where: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: {name}={value!r} must be an int >= 0")
    return value


def _seeded_state(device: str, seed: int) -> Tensor:
    """A generator state for `device` freshly seeded with `seed`, leaving the default RNG alone."""
    return torch.Generator(device=device).manual_seed(seed).get_state()


@contextlib.contextmanager
def manual_seed_within(seed: int, devices: list[str]) -> Generator[None, None, None]:
    """The default generators of `devices` ("cpu", "cuda:N") seeded with `seed` inside the
    block, their previous states put back after it."""
    saved = {device: _get_state(device) for device in devices}
    for device in devices:
        _set_state(device, _seeded_state(device, seed))
    try:
        yield
    finally:
        for device in devices:
            _set_state(device, saved[device])


class RNGStatesTracker:
    """Named RNG streams, each seeded once with `add` and swapped in with `fork`.

    A stream keeps one generator state per device (CPU, and each CUDA device it was used on),
    created from its seed on first use; `get_states`/`set_states` save and restore them (for
    checkpoints).
    """

    def __init__(self) -> None:
        self._seeds: dict[str, int] = {}
        self._states: dict[str, dict[str, Tensor]] = {}

    def reset(self) -> None:
        """Forget every stream."""
        self._seeds.clear()
        self._states.clear()

    def names(self) -> list[str]:
        """The names of the streams added so far."""
        return list(self._seeds)

    def add(self, name: str, seed: int) -> None:
        """Add the stream `name` seeded with `seed`; both must be new to this tracker."""
        seed = _require_seed("RNGStatesTracker.add", "seed", seed)
        if name in self._seeds:
            raise ValueError(f"RNGStatesTracker.add: a stream named {name!r} already exists; "
                             "call reset() first to reseed")
        if seed in self._seeds.values():
            raise ValueError(f"RNGStatesTracker.add: seed {seed} is already used by another "
                             "stream; two streams with one seed would draw the same numbers")
        self._seeds[name] = seed
        self._states[name] = {}

    def get_states(self) -> dict[str, dict[str, Tensor]]:
        """A copy of every stream's generator states, `{name: {device: state}}`."""
        return {name: {device: state.clone() for device, state in states.items()}
                for name, states in self._states.items()}

    def set_states(self, states: dict[str, dict[str, Tensor]]) -> None:
        """Restore generator states saved by `get_states` (for streams already added)."""
        unknown = sorted(set(states) - set(self._seeds))
        if unknown:
            raise ValueError(f"RNGStatesTracker.set_states: streams {unknown} were never added; "
                             f"known streams: {self.names()}")
        for name, device_states in states.items():
            self._states[name] = {device: state.clone() for device, state in device_states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG_TRACKER_NAME) -> Generator[None, None, None]:
        """Draw from stream `name` inside the `with` block; the default RNG is untouched by it."""
        if name not in self._seeds:
            raise ValueError(
                f"RNGStatesTracker.fork: no stream named {name!r} (known: {self.names()}); call "
                "model_parallel_manual_seed(seed, tp_rank) or add(name, seed) first")
        stream = self._states[name]
        devices = _active_devices()
        saved = {device: _get_state(device) for device in devices}
        for device in devices:
            state = stream.get(device)
            _set_state(device, state if state is not None else
                       _seeded_state(device, self._seeds[name]))
        try:
            yield
        finally:
            for device in devices:
                stream[device] = _get_state(device)
                _set_state(device, saved[device])


model_parallel_rng_tracker = RNGStatesTracker()
"""The process-wide tracker that tensor-parallel layers fork for dropout."""


def get_rng_tracker() -> RNGStatesTracker:
    """The process-wide tracker (`model_parallel_rng_tracker`)."""
    return model_parallel_rng_tracker


def model_parallel_manual_seed(seed: int, tp_rank: int, *,
                               tracker: RNGStatesTracker | None = None) -> None:
    """Seed the default RNG with `seed` and the model-parallel stream per tensor-parallel rank.

    Call on every rank with the same `seed` before building the model: the default RNG (CPU and
    every CUDA device) then agrees across tensor-parallel ranks, and the tracker's
    `MODEL_PARALLEL_RNG_TRACKER_NAME` stream is seeded with `seed + 2718 + tp_rank`, so it
    differs between them. `tracker` defaults to `model_parallel_rng_tracker`; it is reset.
    """
    seed = _require_seed("model_parallel_manual_seed", "seed", seed)
    tp_rank = _require_seed("model_parallel_manual_seed", "tp_rank", tp_rank)
    torch.manual_seed(seed)  # pyright: ignore[reportUnknownMemberType]  # torch leaves `seed` unannotated
    tracker = model_parallel_rng_tracker if tracker is None else tracker
    tracker.reset()
    tracker.add(MODEL_PARALLEL_RNG_TRACKER_NAME, seed + _MODEL_PARALLEL_SEED_OFFSET + tp_rank)


def tensor_parallel_rng_fork(group: ProcessGroup | None, *,
                             tracker: RNGStatesTracker | None = None
                             ) -> AbstractContextManager[None]:
    """Draw from the per-rank model-parallel stream when `group` has several ranks.

    Wrap dropout on activations that differ across the tensor-parallel ranks of `group` (this
    rank's attention heads, this rank's slice of the sequence under sequence parallelism):
    each rank then draws its own mask, as slices of one single-process mask would differ. With
    one rank (or `group=None`) the default RNG is used and nothing is swapped. Dropout on
    *replicated* activations must not use it: those masks must agree across ranks.
    """
    if group_size(group) == 1:
        return contextlib.nullcontext()
    tracker = model_parallel_rng_tracker if tracker is None else tracker
    return tracker.fork()


def checkpoint_rng_context_fn(
    tracker: RNGStatesTracker | None = None,
) -> Callable[[], tuple[AbstractContextManager[None], AbstractContextManager[None]]]:
    """A `context_fn` for `torch.utils.checkpoint.checkpoint(use_reentrant=False)`.

    Activation checkpointing restores the *default* RNG before recomputing a forward, but not
    the tracker's streams: dropout drawn inside `tracker.fork()` would draw a different mask
    when recomputed, and the gradients would be wrong. The forward context records the
    streams' states; the recompute context puts them back for the recomputation and then
    restores the states the streams had reached meanwhile.
    """
    tracker = model_parallel_rng_tracker if tracker is None else tracker
    resolved = tracker

    def context_fn() -> tuple[AbstractContextManager[None], AbstractContextManager[None]]:
        recorded: list[dict[str, dict[str, Tensor]]] = []

        @contextlib.contextmanager
        def forward() -> Generator[None, None, None]:
            recorded.append(resolved.get_states())
            yield

        @contextlib.contextmanager
        def recompute() -> Generator[None, None, None]:
            if not recorded:  # the forward context did not run: nothing to replay
                yield
                return
            current = resolved.get_states()
            resolved.set_states(recorded[0])
            try:
                yield
            finally:
                resolved.set_states(current)

        return forward(), recompute()

    return context_fn
