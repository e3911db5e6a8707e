"""Whole models assembled from layer specs."""

from protoformer.models.gpt import GPTModel

__all__ = ["GPTModel"]
