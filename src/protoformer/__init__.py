"""protoformer: PyTorch transformer building blocks whose wiring is typed."""

from protoformer.config import MLATransformerConfig, TransformerConfig

__version__ = "0.1.0"

__all__ = ["MLATransformerConfig", "TransformerConfig", "__version__"]
