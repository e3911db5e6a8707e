"""Whole models assembled from layer specs."""

from protoformer.models.compile import compile_layers
from protoformer.models.gpt import GPTModel
from protoformer.models.t5 import T5Model

__all__ = ["GPTModel", "T5Model", "compile_layers"]
