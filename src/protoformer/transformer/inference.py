"""State for incremental decoding: per-layer key/value caches and the current offset."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["InferenceContext"]


@dataclass
class InferenceContext:
    """Caches of one generation run, shared by every layer of a model.

    Each attention layer allocates its cache on first use, keyed by its `layer_number`, sized
    `max_sequence_length` x `max_batch_size`, and writes the keys/values of the tokens it is
    given at positions `sequence_len_offset ...`. The caller advances `sequence_len_offset`
    by the number of tokens processed after each model forward (`increment`).

    Static-shape decoding (what a CUDA graph can capture): with `positions` set, a device
    tensor `[b]` holding each row's position of its next token, rows may sit at different
    positions (prompts of different lengths). Every self-attention layer then writes its
    new keys/values at those rows' positions into the full-length cache, attends over the
    whole cache with later positions blocked (`decode_mask`), and the model advances
    `positions` in place; `sequence_len_offset` is not used.
    """

    max_batch_size: int
    max_sequence_length: int
    sequence_len_offset: int = 0
    key_value_memory_dict: dict[int, tuple[Tensor, ...]] = field(default_factory=dict[int, tuple[Tensor, ...]])
    positions: Tensor | None = None  # [b] long: static-shape decoding, each row's next position
    # Sliding-window layers keep only their last W positions (a rolling cache, so decoding
    # memory stops growing); static-shape decoding, which writes by position into the
    # full-length caches, turns it off.
    roll_window_caches: bool = True
    # Tensors every layer of one static step shares (positions, mask, rotary rows), made once
    # per step: the model calls `start_step` at the start of each forward.
    _step_tensors: dict[object, Tensor] = field(
        default_factory=dict[object, Tensor], init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_sequence_length < 1:
            raise ValueError(
                f"InferenceContext(max_batch_size={self.max_batch_size}, max_sequence_length="
                f"{self.max_sequence_length}): both must be >= 1")

    def increment(self, num_tokens: int) -> None:
        """Advance the write position after a forward over `num_tokens` new tokens."""
        self.sequence_len_offset += num_tokens

    def check_room(self, num_tokens: int) -> None:
        """Raise `ValueError` when `num_tokens` more tokens would overflow the caches."""
        end = self.sequence_len_offset + num_tokens
        if end > self.max_sequence_length:
            raise ValueError(
                f"decoding {num_tokens} token(s) at offset {self.sequence_len_offset} needs "
                f"{end} cache positions but max_sequence_length={self.max_sequence_length}; "
                "create the InferenceContext with a larger max_sequence_length")

    def start_step(self) -> None:
        """Forget the tensors of the last static step (the positions have moved since)."""
        self._step_tensors.clear()

    def decode_positions(self, num_tokens: int) -> Tensor:
        """Static decoding: the positions `[s, b]` of `num_tokens` new tokens of every row."""
        positions = self.positions
        if positions is None:
            raise ValueError("decode_positions needs InferenceContext.positions (static decoding)")
        key = ("positions", num_tokens)
        if key not in self._step_tensors:
            steps = torch.arange(num_tokens, device=positions.device)  # [s]
            self._step_tensors[key] = positions[None, :] + steps[:, None]  # [s, b]
        return self._step_tensors[key]

    def decode_rows(self, num_tokens: int) -> Tensor:
        """Static decoding: each new token's batch row `[s, b]` (the cache column it writes)."""
        key = ("rows", num_tokens)
        if key not in self._step_tensors:
            positions = self.decode_positions(num_tokens)  # [s, b]
            rows = torch.arange(positions.shape[1], device=positions.device)  # [b]
            self._step_tensors[key] = rows.expand_as(positions)  # [s, b]
        return self._step_tensors[key]

    def decode_mask(self, num_tokens: int, *, window: int | None = None) -> Tensor:
        """Static decoding: True where a new token must not attend, `[b, 1, s, max_s]`.

        Keys after the query's own position are blocked (the causal rule within the row;
        positions not written yet hold stale values); with a sliding `window`, so are keys
        `window` or more positions before it.
        """
        key = ("mask", num_tokens, window)
        if key not in self._step_tensors:
            queries = self.decode_positions(num_tokens)  # [s, b]
            keys = torch.arange(self.max_sequence_length, device=queries.device)  # [max_s]
            blocked = keys[None, None, :] > queries[:, :, None]  # [s, b, max_s]
            if window is not None:
                blocked = blocked | (keys[None, None, :] <= queries[:, :, None] - window)
            self._step_tensors[key] = blocked.permute(1, 0, 2)[:, None]  # [b, 1, s, max_s]
        return self._step_tensors[key]

    def rotary_rows(self, table: Tensor, num_tokens: int) -> Tensor:
        """Static decoding: rows of a rotary table `[positions, 1, 1, rot]` at each new token's
        position, `[s, b, 1, rot]`."""
        key = ("rotary", id(table), num_tokens)
        if key not in self._step_tensors:
            positions = self.decode_positions(num_tokens)  # [s, b]
            rows = table[:, 0, 0].index_select(0, positions.reshape(-1))  # [s * b, rot]
            self._step_tensors[key] = rows.view(*positions.shape, 1, table.shape[-1])
        return self._step_tensors[key]

    def reset(self) -> None:
        """Forget every cache and start again at offset 0."""
        self.sequence_len_offset = 0
        self.positions = None
        self._step_tensors.clear()
        self.key_value_memory_dict.clear()
