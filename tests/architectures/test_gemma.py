"""Gemma against transformers: scaled embeddings, (1 + w) RMSNorm, tanh-GeLU, MQA with a head
size other than hidden / heads, tied output layer."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="Hugging Face transformers is not installed")

from protoformer.interop import UnsupportedHFModelError, from_hf, parse_hf_config  # noqa: E402
from protoformer.recipes import get_preset  # noqa: E402
from tests.architectures import hf_testkit as kit  # noqa: E402

SIZES = {"vocab_size": kit.VOCAB, "hidden_size": 64, "intermediate_size": 112,
         "num_hidden_layers": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
         "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 24}


def gemma(**overrides: Any) -> Any:
    from transformers import GemmaConfig

    # Norm weights near 0: Gemma scales by 1 + w.
    return kit.build_hf(GemmaConfig(**{**SIZES, **overrides}), seed=21, norm_center=0.0)


def test_gemma_matches_transformers(tmp_path: Path) -> None:
    ours = kit.check_family(gemma(), tmp_path)
    config = ours.config
    assert config.layernorm_zero_centered_gamma and config.query_groups == 1
    assert config.head_dim == 24 and config.embedding_multiplier == math.sqrt(64)
    assert ours.share_embeddings_and_output_weights


def test_without_the_gemma_options_the_logits_differ() -> None:
    # Guards the test above: each Gemma option changes the numbers.
    hf_model = gemma()
    ours = from_hf(hf_model)
    ours.config.embedding_multiplier = 1.0
    assert kit.max_logit_difference(hf_model, ours) > 1e-2


def test_fresh_gemma_norms_start_at_zero() -> None:
    model = get_preset("gemma-2b").build_model(device="meta")
    assert model.config.layernorm_zero_centered_gamma
    tiny = from_hf(gemma())
    tiny.init_weights()
    norm = tiny.decoder.layers[0].input_layernorm
    assert isinstance(norm, torch.nn.Module)
    assert torch.count_nonzero(norm.weight) == 0  # scale 1 + 0 = 1


def test_unsupported_gemma_features_are_named() -> None:
    values = gemma().config.to_dict()
    with pytest.raises(UnsupportedHFModelError, match="use_bidirectional_attention"):
        parse_hf_config({**values, "use_bidirectional_attention": True})
    with pytest.raises(UnsupportedHFModelError, match="multimodal"):
        parse_hf_config({**values, "model_type": "gemma3"})


def test_a_soft_capped_config_does_not_export_as_the_first_gemma() -> None:
    import dataclasses

    from protoformer.architectures.registry import ModelSizes, causal_lm_architecture

    architecture = causal_lm_architecture({"model_type": "gemma"})
    config = from_hf(gemma()).config
    sizes = ModelSizes(vocab_size=kit.VOCAB, max_sequence_length=128, tie_word_embeddings=True)
    assert architecture.write_config(config, sizes)["model_type"] == "gemma"
    capped = dataclasses.replace(config, final_logit_softcapping=30.0)
    with pytest.raises(UnsupportedHFModelError, match=r"final_logit_softcapping=30\.0.*gemma2"):
        architecture.write_config(capped, sizes)
