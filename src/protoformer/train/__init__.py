"""Training: the byte corpus, the loop, its learning-rate schedule and checkpoints."""

from protoformer.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from protoformer.train.data import BatchSampler, Corpus, DataError, load_corpus, validation_batches
from protoformer.train.loop import StepMetrics, TrainOptions, TrainResult, train
from protoformer.train.schedule import WarmupCosineSchedule

__all__ = [
    "BatchSampler",
    "CheckpointError",
    "Corpus",
    "DataError",
    "StepMetrics",
    "TrainOptions",
    "TrainResult",
    "WarmupCosineSchedule",
    "latest_checkpoint",
    "load_checkpoint",
    "load_corpus",
    "resolve_checkpoint",
    "save_checkpoint",
    "train",
    "validation_batches",
]
