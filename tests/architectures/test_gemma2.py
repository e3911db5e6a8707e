"""Gemma 2 against transformers: sandwich norms, alternating sliding/global layers (checked
past the window), attention and final-logit soft-capping, query_pre_attn_scalar."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="Hugging Face transformers is not installed")

from protoformer.interop import UnsupportedHFModelError, from_hf, parse_hf_config  # noqa: E402
from protoformer.recipes import get_preset  # noqa: E402
from protoformer.transformer.norm import RMSNorm  # noqa: E402
from tests.architectures import hf_testkit as kit  # noqa: E402

# Window 6 < the 24 tokens compared and the 26 generated; small caps so both matter.
SIZES = {"vocab_size": kit.VOCAB, "hidden_size": 64, "intermediate_size": 112,
         "num_hidden_layers": 3, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24,
         "query_pre_attn_scalar": 40, "sliding_window": 6,
         "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0}


def gemma2(**overrides: Any) -> Any:
    from transformers import Gemma2Config

    config = Gemma2Config(**{**SIZES, **overrides})
    config._attn_implementation = "eager"  # the reference soft-caps (SDPA cannot)
    return kit.build_hf(config, seed=22, norm_center=0.0)


def test_gemma2_matches_transformers(tmp_path: Path) -> None:
    hf_model = gemma2()
    ours = kit.check_family(hf_model, tmp_path)
    config = ours.config
    assert config.attn_logit_softcapping == 2.0 and config.final_logit_softcapping == 3.0
    assert config.softmax_scale == pytest.approx(40 ** -0.5)
    windows = [layer.self_attention.window_size for layer in ours.decoder.layers]
    assert windows == [6, None, 6]
    assert isinstance(ours.decoder.layers[0].post_mlp_layernorm, RMSNorm)


def test_each_gemma2_option_changes_the_logits() -> None:
    # Guards the test above: without soft-capping, the softmax scale or the sliding window the
    # numbers differ from transformers'.
    hf_model = gemma2()
    for field, value in (("attn_logit_softcapping", None), ("final_logit_softcapping", None),
                         ("softmax_scale", None)):
        ours = from_hf(hf_model)
        setattr(ours.config, field, value)
        for module in ours.modules():
            if hasattr(module, field):
                setattr(module, field, value)
        assert kit.max_logit_difference(hf_model, ours) > 1e-3, field
    ours = from_hf(hf_model)
    ours.decoder.layers[0].self_attention.core_attention.window_size = None
    assert kit.max_logit_difference(hf_model, ours) > 1e-3


def test_gemma2_default_layer_pattern_and_preset() -> None:
    values = gemma2().config.to_dict()
    del values["layer_types"]
    info = parse_hf_config(values)
    assert info.config.attn_logit_softcapping == 2.0
    model = get_preset("gemma2-2b").build_model(device="meta")
    assert [layer.self_attention.window_size for layer in model.decoder.layers[:3]] \
        == [4096, None, 4096]
    assert model.config.final_logit_softcapping == 30.0


def test_unsupported_gemma2_features_are_named() -> None:
    values = gemma2().config.to_dict()
    with pytest.raises(UnsupportedHFModelError, match="use_bidirectional_attention"):
        parse_hf_config({**values, "use_bidirectional_attention": True})
    with pytest.raises(UnsupportedHFModelError, match="attention_bias"):
        parse_hf_config({**values, "attention_bias": True})
