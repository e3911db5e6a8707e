"""How self- and cross-attention keep their keys and values in an `InferenceContext`.

Self-attention appends each step's keys/values to a cache `[max_s, max_b, ng, hn]` (one for
keys, one for values) allocated on first use under its `layer_number`. Cross-attention
projects its memory once and keeps the result under `-layer_number`, apart from the
self-attention cache of the same layer.
"""

from __future__ import annotations

from torch import Tensor

from protoformer.transformer.inference import InferenceContext

__all__ = ["append_to_kv_cache", "cached_memory", "store_memory"]


def append_to_kv_cache(context: InferenceContext, layer_number: int, key: Tensor, value: Tensor,
                       *, num_query_groups: int, head_dim: int) -> tuple[Tensor, Tensor]:
    """Write this step's keys/values `[s, b, ng, hn]` at `[offset, offset + s)`; return all of
    `[0, offset + s)` (`num_query_groups` and `head_dim` size the cache on first use)."""
    s, batch = key.shape[0], key.shape[1]
    context.check_room(s)
    if batch > context.max_batch_size:
        raise ValueError(f"a batch of {batch} exceeds the InferenceContext's max_batch_size="
                         f"{context.max_batch_size}")
    cache = context.key_value_memory_dict.get(layer_number)
    if cache is None:
        shape = (context.max_sequence_length, context.max_batch_size, num_query_groups, head_dim)
        cache = (key.new_zeros(shape), value.new_zeros(shape))  # [max_s, max_b, ng, hn] each
        context.key_value_memory_dict[layer_number] = cache
    if len(cache) != 2:
        raise ValueError(f"InferenceContext entry {layer_number} holds {len(cache)} "
                         "tensors, not a key/value pair: two layers share a layer_number")
    key_cache, value_cache = cache
    start, end = context.sequence_len_offset, context.sequence_len_offset + s
    key_cache[start:end, :batch] = key
    value_cache[start:end, :batch] = value
    return key_cache[:end, :batch], value_cache[:end, :batch]


def cached_memory(context: InferenceContext | None,
                  layer_number: int) -> tuple[Tensor, Tensor] | None:
    """The projected memory (key, value) cross-attention layer `layer_number` stored, if any."""
    if context is None or -layer_number not in context.key_value_memory_dict:
        return None
    key, value = context.key_value_memory_dict[-layer_number]
    return key, value


def store_memory(context: InferenceContext, layer_number: int, key: Tensor, value: Tensor) -> None:
    """Keep cross-attention layer `layer_number`'s projected memory for the next steps."""
    context.key_value_memory_dict[-layer_number] = (key, value)
