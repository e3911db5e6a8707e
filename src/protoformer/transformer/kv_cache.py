"""How self- and cross-attention keep their keys and values in an `InferenceContext`.

Self-attention appends each step's keys/values to a cache `[max_s, max_b, ng, hn]` (one for
keys, one for values) allocated on first use under its `layer_number`; sliding-window
self-attention keeps a rolling cache of the last `W` positions `[W, max_b, ng, hn]` instead,
so its memory does not grow with the generated length. Cross-attention
projects its memory once and keeps the result under `-layer_number`, apart from the
self-attention cache of the same layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from protoformer.transformer.inference import InferenceContext

__all__ = ["append_to_kv_cache", "append_to_window_cache", "cached_memory", "store_memory",
           "write_kv_cache_at_positions"]


def append_to_kv_cache(context: InferenceContext, layer_number: int, key: Tensor, value: Tensor,
                       *, num_query_groups: int, head_dim: int) -> tuple[Tensor, Tensor]:
    """Write this step's keys/values `[s, b, ng, hn]` at `[offset, offset + s)`; return all of
    `[0, offset + s)` (`num_query_groups` and `head_dim` size the cache on first use)."""
    s, batch = key.shape[0], key.shape[1]
    context.check_room(s)
    if batch > context.max_batch_size:
        raise ValueError(f"a batch of {batch} exceeds the InferenceContext's max_batch_size="
                         f"{context.max_batch_size}")
    key_cache, value_cache = _self_attention_cache(context, layer_number, key, value,
                                                   num_query_groups, head_dim)
    start, end = context.sequence_len_offset, context.sequence_len_offset + s
    key_cache[start:end, :batch] = key
    value_cache[start:end, :batch] = value
    return key_cache[:end, :batch], value_cache[:end, :batch]


def append_to_window_cache(context: InferenceContext, layer_number: int, key: Tensor,
                           value: Tensor, *, window: int, num_query_groups: int,
                           head_dim: int) -> tuple[Tensor, Tensor]:
    """Sliding-window layers: this step's keys/values `[s, b, ng, hn]` after the cached ones.

    The cache `[W, max_b, ng, hn]` (`W = min(window, max_sequence_length)`) holds the last
    `kept = min(offset, W)` positions, oldest first. Returns the keys/values of positions
    `[offset - kept, offset + s)` — `[kept + s, b, ng, hn]`, contiguous, so the core's
    bottom-right aligned causal and window masks apply unchanged — and keeps their last `W`.
    """
    s, batch = key.shape[0], key.shape[1]
    context.check_room(s)
    if batch > context.max_batch_size:
        raise ValueError(f"a batch of {batch} exceeds the InferenceContext's max_batch_size="
                         f"{context.max_batch_size}")
    size = min(window, context.max_sequence_length)
    cache = context.key_value_memory_dict.get(layer_number)
    if cache is None:
        shape = (size, context.max_batch_size, num_query_groups, head_dim)
        cache = (key.new_zeros(shape), value.new_zeros(shape))  # [W, max_b, ng, hn] each
        context.key_value_memory_dict[layer_number] = cache
    if len(cache) != 2 or cache[0].shape[0] != size:
        raise ValueError(f"InferenceContext entry {layer_number} is not this sliding-window "
                         "layer's cache: two layers share a layer_number")
    key_cache, value_cache = cache
    kept = min(context.sequence_len_offset, size)
    keys = torch.cat((key_cache[:kept, :batch], key.to(key_cache.dtype)))  # [kept + s, b, ng, hn]
    values = torch.cat((value_cache[:kept, :batch], value.to(value_cache.dtype)))
    tail = min(size, keys.shape[0])
    key_cache[:tail, :batch] = keys[-tail:]  # the newest W positions, oldest first
    value_cache[:tail, :batch] = values[-tail:]
    return keys, values


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


def write_kv_cache_at_positions(context: InferenceContext, layer_number: int, key: Tensor,
                                value: Tensor, *, num_query_groups: int,
                                head_dim: int) -> tuple[Tensor, Tensor]:
    """Static decoding: write keys/values `[s, b, ng, hn]` at each row's `context.positions`;
    return the whole cache `[max_s, b, ng, hn]` (shapes and addresses fixed, for CUDA graphs).

    Mask the result with `context.decode_mask(s)`. Positions are not range-checked here
    (that would synchronise with the device): the decoder bounds them on the host.
    """
    batch = key.shape[1]
    if batch > context.max_batch_size:
        raise ValueError(f"a batch of {batch} exceeds the InferenceContext's max_batch_size="
                         f"{context.max_batch_size}")
    key_cache, value_cache = _self_attention_cache(context, layer_number, key, value,
                                                   num_query_groups, head_dim)
    rows = context.decode_positions(key.shape[0])  # [s, b]
    columns = context.decode_rows(key.shape[0])  # [s, b]: each row's batch index
    key_cache.index_put_((rows, columns), key.to(key_cache.dtype))
    value_cache.index_put_((rows, columns), value.to(value_cache.dtype))
    return key_cache[:, :batch], value_cache[:, :batch]  # [max_s, b, ng, hn]


def _self_attention_cache(context: InferenceContext, layer_number: int, key: Tensor,
                          value: Tensor, num_query_groups: int,
                          head_dim: int) -> tuple[Tensor, Tensor]:
    """Layer `layer_number`'s key and value caches `[max_s, max_b, ng, hn]`, allocated on first use."""
    cache = context.key_value_memory_dict.get(layer_number)
    if cache is None:
        shape = (context.max_sequence_length, context.max_batch_size, num_query_groups, head_dim)
        cache = (key.new_zeros(shape), value.new_zeros(shape))  # [max_s, max_b, ng, hn] each
        context.key_value_memory_dict[layer_number] = cache
    if len(cache) != 2:
        raise ValueError(f"InferenceContext entry {layer_number} holds {len(cache)} "
                         "tensors, not a key/value pair: two layers share a layer_number")
    return cache[0], cache[1]
