"""Small real models for the training tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from protoformer.backends import get_backend
from protoformer.config import TransformerConfig
from protoformer.models import GPTModel
from protoformer.recipes import get_preset, gpt_layer_spec


def small_gpt(*, tied: bool = False, hidden_size: int = 32, seed: int = 0) -> GPTModel:
    """The tiny preset's architecture, narrower and shorter, so tests stay fast."""
    config = TransformerConfig(num_layers=2, hidden_size=hidden_size, num_attention_heads=4,
                               ffn_hidden_size=64, normalization="RMSNorm", add_bias_linear=False,
                               gated_linear_unit=True, activation_func=torch.nn.functional.silu,
                               attention_dropout=0.0, hidden_dropout=0.0)
    torch.manual_seed(seed)
    return GPTModel(config, gpt_layer_spec(get_backend("local"), config), 256, 64,
                    share_embeddings_and_output_weights=tied)


@pytest.fixture
def make_gpt() -> Callable[..., GPTModel]:
    """`small_gpt` as a fixture (test modules here are not a package, so no relative import)."""
    return small_gpt


@pytest.fixture
def tiny_model() -> GPTModel:
    torch.manual_seed(0)
    return get_preset("tiny").build_model()
