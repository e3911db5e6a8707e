"""State for incremental decoding: per-layer key/value caches and the current offset."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["InferenceContext"]


@dataclass
class InferenceContext:
    """Caches of one generation run, shared by every layer of a model.

    Each attention layer allocates its cache on first use, keyed by its `layer_number`, sized
    `max_sequence_length` x `max_batch_size`, and writes the keys/values of the tokens it is
    given at positions `sequence_len_offset ...`. The caller advances `sequence_len_offset`
    by the number of tokens processed after each model forward (`increment`).
    """

    max_batch_size: int
    max_sequence_length: int
    sequence_len_offset: int = 0
    key_value_memory_dict: dict[int, tuple[Tensor, ...]] = field(default_factory=dict[int, tuple[Tensor, ...]])

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

    def reset(self) -> None:
        """Forget every cache and start again at offset 0."""
        self.sequence_len_offset = 0
        self.key_value_memory_dict.clear()
