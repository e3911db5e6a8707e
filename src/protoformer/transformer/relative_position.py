"""T5's bucketed relative position bias, added to the attention scores of every layer.

A learned scalar per (bucket, head). The bucket of a (query, key) pair depends on the signed
distance `key_position - query_position`: small distances get a bucket each, larger ones
share logarithmically wider buckets up to `max_distance`, beyond which all distances share
the last bucket. Bidirectional attention (an encoder) spends half of the buckets on keys
after the query; unidirectional attention (a causal decoder) only looks back and uses all
of them for keys at or before the query. This is the scheme of Raffel et al. (2020), as in
Megatron-Core's `RelativePositionEmbedding` and Hugging Face's T5.

Under tensor parallelism each rank holds the columns of its own attention heads (the same
contiguous head range the attention layers give it), so the bias never leaves the rank.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from protoformer.config import TransformerConfig
from protoformer.initialization import init_method_normal
from protoformer.parallel.groups import ProcessGroup, group_size
from protoformer.parallel.parameters import divide, new_weight, require_size
from protoformer.parallel.protocols import InitMethod

__all__ = ["RelativePositionEmbedding", "relative_position_bucket"]


def relative_position_bucket(relative_position: Tensor, *, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> Tensor:
    """The bucket (int64, in `[0, num_buckets)`) of each signed distance `key - query`."""
    if bidirectional:
        half = num_buckets // 2
        offset = torch.where(relative_position > 0, half, 0)  # keys after the query
        distance = relative_position.abs()
        buckets = half
    else:
        offset = torch.zeros_like(relative_position)
        distance = (-relative_position).clamp(min=0)  # keys after the query share bucket 0
        buckets = num_buckets
    exact = buckets // 2
    # The logarithmic part, computed in float32 like the reference implementations so that
    # distances on a bucket boundary land in the same bucket.
    log_ratio = torch.log(distance.float().clamp(min=1.0) / exact) / math.log(max_distance / exact)
    far = exact + (log_ratio * (buckets - exact)).to(torch.int64)
    far = far.clamp(max=buckets - 1)
    return offset + torch.where(distance < exact, distance, far)


class RelativePositionEmbedding(nn.Module):
    """`forward(sq, sk, offset=0)` -> the additive bias `[1, np / tp, sq, sk]` of this rank's heads.

    Queries sit at positions `offset ... offset + sq - 1` and keys at `0 ... sk - 1` (decoding
    against a key/value cache passes the cache offset). The weight is `[num_buckets, np / tp]`.
    """

    def __init__(
        self,
        config: TransformerConfig,
        *,
        bidirectional: bool,
        num_buckets: int = 32,
        max_distance: int = 128,
        init_method: InitMethod | None = None,
        tp_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        layer = "RelativePositionEmbedding"
        self.num_buckets = require_size(layer, "relative_attention_num_buckets", num_buckets)
        self.max_distance = require_size(layer, "relative_attention_max_distance", max_distance)
        per_side = num_buckets // 2 if bidirectional else num_buckets
        exact = per_side // 2  # distances below this get a bucket each
        if exact < 1 or max_distance <= exact:
            raise ValueError(
                f"{layer}: num_buckets={num_buckets}, max_distance={max_distance} leave no "
                f"room for the logarithmic buckets; use num_buckets >= {4 if bidirectional else 2} "
                f"and max_distance > {max(exact, 1)}")
        self.bidirectional = bidirectional
        heads = config.num_attention_heads
        divide(layer, "num_attention_heads", heads, group_size(tp_group))
        self.weight = new_weight(
            (num_buckets, heads), partition_dim=1, tp_group=tp_group, config=config,
            init_method=init_method or init_method_normal(config.init_method_std))

    def forward(self, query_seq_length: int, key_seq_length: int, offset: int = 0) -> Tensor:
        """The bias `[1, np / tp, sq, sk]` for queries at `offset + i` and keys at `j`."""
        device = self.weight.device
        query = torch.arange(offset, offset + query_seq_length, device=device).unsqueeze(1)  # [sq, 1]
        key = torch.arange(key_seq_length, device=device).unsqueeze(0)  # [1, sk]
        bucket = relative_position_bucket(
            key - query, bidirectional=self.bidirectional, num_buckets=self.num_buckets,
            max_distance=self.max_distance)  # [sq, sk]
        values = nn.functional.embedding(bucket, self.weight)  # [sq, sk, np / tp]
        return values.permute(2, 0, 1).unsqueeze(0)  # [1, np / tp, sq, sk]

    def extra_repr(self) -> str:
        return (f"num_buckets={self.num_buckets}, max_distance={self.max_distance}, "
                f"bidirectional={self.bidirectional}, heads_per_rank={self.weight.shape[1]}")
