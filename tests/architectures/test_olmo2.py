"""OLMo 2 against transformers: norms after attention and MLP only, q/k norms over the whole
projection, grouped key/value heads, untied head."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="Hugging Face transformers is not installed")

from protoformer.interop import UnsupportedHFModelError, from_hf, parse_hf_config  # noqa: E402
from protoformer.recipes import get_preset  # noqa: E402
from protoformer.transformer.norm import IdentityOp  # noqa: E402
from protoformer.transformer.projection_norm import ProjectionRMSNorm  # noqa: E402
from tests.architectures import hf_testkit as kit  # noqa: E402

SIZES = {"vocab_size": kit.VOCAB, "hidden_size": 64, "intermediate_size": 112,
         "num_hidden_layers": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
         "num_attention_heads": 4, "num_key_value_heads": 2}


def olmo2(**overrides: Any) -> Any:
    from transformers import Olmo2Config

    return kit.build_hf(Olmo2Config(**{**SIZES, **overrides}), seed=24)


def test_olmo2_matches_transformers(tmp_path: Path) -> None:
    ours = kit.check_family(olmo2(), tmp_path)
    layer = ours.decoder.layers[0]
    assert isinstance(layer.input_layernorm, IdentityOp)
    assert isinstance(layer.pre_mlp_layernorm, IdentityOp)
    assert isinstance(layer.self_attention.k_layernorm, ProjectionRMSNorm)
    assert not ours.share_embeddings_and_output_weights


def test_olmo2_post_norms_matter() -> None:
    # Guards the test above: dropping the post-attention norm changes the numbers.
    hf_model = olmo2()
    ours = from_hf(hf_model)
    ours.decoder.layers[0].post_self_attn_layernorm = None
    assert kit.max_logit_difference(hf_model, ours) > 1e-3


def test_olmo2_preset_and_refusals() -> None:
    model = get_preset("olmo2-1b").build_model(device="meta")
    assert isinstance(model.decoder.layers[0].input_layernorm, IdentityOp)
    values = olmo2().config.to_dict()
    with pytest.raises(UnsupportedHFModelError, match="attention_bias"):
        parse_hf_config({**values, "attention_bias": True})
    with pytest.raises(UnsupportedHFModelError, match="rope_type='yarn'"):
        parse_hf_config({**values, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})
