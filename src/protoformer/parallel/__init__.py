"""Tensor-parallel layers and process groups (single-process by default)."""

from protoformer.parallel.cross_entropy import vocab_parallel_cross_entropy
from protoformer.parallel.groups import ProcessGroups
from protoformer.parallel.layers import (
    ColumnParallelLinear,
    Linear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from protoformer.parallel.protocols import (
    ColumnParallelLinearBuilder,
    ColumnParallelLinearInterface,
    InitMethod,
    LinearBuilder,
    LinearLayerInterface,
    RowParallelLinearBuilder,
    RowParallelLinearInterface,
)
from protoformer.parallel.random import (
    RNGStatesTracker,
    get_rng_tracker,
    model_parallel_manual_seed,
    model_parallel_rng_tracker,
)

__all__ = [
    "ColumnParallelLinear",
    "ColumnParallelLinearBuilder",
    "ColumnParallelLinearInterface",
    "InitMethod",
    "Linear",
    "LinearBuilder",
    "LinearLayerInterface",
    "ProcessGroups",
    "RNGStatesTracker",
    "RowParallelLinear",
    "RowParallelLinearBuilder",
    "RowParallelLinearInterface",
    "VocabParallelEmbedding",
    "get_rng_tracker",
    "model_parallel_manual_seed",
    "model_parallel_rng_tracker",
    "vocab_parallel_cross_entropy",
]
