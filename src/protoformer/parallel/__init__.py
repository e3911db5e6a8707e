"""Tensor-parallel layers and process groups (single-process by default)."""

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

__all__ = [
    "ColumnParallelLinear",
    "ColumnParallelLinearBuilder",
    "ColumnParallelLinearInterface",
    "InitMethod",
    "Linear",
    "LinearBuilder",
    "LinearLayerInterface",
    "ProcessGroups",
    "RowParallelLinear",
    "RowParallelLinearBuilder",
    "RowParallelLinearInterface",
    "VocabParallelEmbedding",
]
