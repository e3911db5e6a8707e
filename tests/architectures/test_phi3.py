"""Phi-3 against transformers: fused qkv / gate-up checkpoints, partial rotary, LongRoPE,
sliding windows."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="Hugging Face transformers is not installed")

from protoformer.interop import UnsupportedHFModelError, from_hf, parse_hf_config  # noqa: E402
from protoformer.recipes import get_preset  # noqa: E402
from tests.architectures import hf_testkit as kit  # noqa: E402

# 4 query heads of 16 over 2 key/value groups; rotary over half of each head (8 channels:
# 4 pairs) when partial.
SIZES = {"vocab_size": kit.VOCAB, "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 64, "original_max_position_embeddings": 64,
         "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
# LongRoPE: trained on 16 positions, stretched to 64 (the 24-token checks use the long
# factors, a 12-token one the short; generation crosses from short to long).
LONGROPE = {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                "partial_rotary_factor": 0.5,
                                "short_factor": [1.0, 1.3, 1.9, 2.6],
                                "long_factor": [1.2, 2.5, 4.0, 7.5]},
            "original_max_position_embeddings": 16}


def phi3(**overrides: Any) -> Any:
    from transformers import Phi3Config

    return kit.build_hf(Phi3Config(**{**SIZES, **overrides}), seed=31)


def test_phi3_with_partial_rotary_and_a_window_matches_transformers(tmp_path: Path) -> None:
    # Half of each head rotates; every layer slides over 6 positions (checks run past it).
    hf_model = phi3(rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                     "partial_rotary_factor": 0.5}, sliding_window=6)
    ours = kit.check_family(hf_model, tmp_path)
    assert ours.config.rotary_percent == 0.5 and ours.config.rotary_base == 500.0
    assert {layer.self_attention.window_size for layer in ours.decoder.layers} == {6}


def test_longrope_phi3_matches_transformers_past_the_original_length(tmp_path: Path) -> None:
    hf_model = phi3(**LONGROPE)
    ours = from_hf(hf_model)
    config = ours.config
    assert config.rope_scaling == "longrope" and config.rope_original_max_position_embeddings == 16
    # transformers' default attention scaling for 64 / 16 = 4 times the trained length.
    assert config.rope_attention_factor == pytest.approx(math.sqrt(1 + math.log(4) / math.log(16)))
    assert kit.max_logit_difference(hf_model, ours, length=12) <= kit.LOGIT_ATOL  # short factors
    kit.assert_same_logits(hf_model, ours, length=24)  # long factors
    kit.assert_same_greedy_generation(hf_model, ours)  # 6 + 20 tokens: crosses 16
    kit.assert_exact_round_trip(hf_model, ours)
    kit.assert_export_loads(hf_model, ours, tmp_path)


def test_without_longrope_or_its_scaling_the_logits_differ() -> None:
    # Guards the test above: the long factors and the attention scaling change the numbers.
    hf_model = phi3(**LONGROPE)
    ours = from_hf(hf_model)
    ours.config.rope_attention_factor = 1.0
    assert kit.max_logit_difference(hf_model, ours, length=24) > 1e-3
    unscaled = from_hf(hf_model)
    assert unscaled.rotary_pos_emb is not None
    unscaled.rotary_pos_emb.long_inv_freq.copy_(unscaled.rotary_pos_emb.inv_freq)
    assert kit.max_logit_difference(hf_model, unscaled, length=24) > 1e-3


def test_phi3_export_of_a_native_model_round_trips(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from protoformer.interop import save_hf

    ours = from_hf(phi3(**LONGROPE))
    config = ours.config
    from protoformer.architectures.phi3 import export_phi3_config
    from protoformer.architectures.registry import ModelSizes

    values = export_phi3_config(config, ModelSizes(kit.VOCAB, 64, False))
    again = parse_hf_config(values).config
    for name in ("rotary_percent", "rope_short_factor", "rope_long_factor",
                 "rope_attention_factor", "rope_original_max_position_embeddings"):
        assert getattr(again, name) == getattr(config, name), name
    save_hf(ours, tmp_path)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)).__name__ == "Phi3ForCausalLM"


def test_unsupported_phi3_features_are_named() -> None:
    values = phi3().config.to_dict()
    with pytest.raises(UnsupportedHFModelError, match=r"rope_type=.dynamic.*phi3"):
        parse_hf_config({**values, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0,
                                                       "rope_theta": 10000.0}})
    with pytest.raises(UnsupportedHFModelError, match="resid_pdrop"):
        parse_hf_config({**values, "resid_pdrop": 0.1, "embd_pdrop": 0.0})
    bad = {**values, "rope_parameters": {**LONGROPE["rope_parameters"], "short_factor": [1.0]}}
    with pytest.raises(ValueError, match="rope_short_factor"):
        parse_hf_config(bad)


def test_phi3_mini_preset_has_the_published_parameter_count() -> None:
    model = get_preset("phi3-mini-4k").build_model(device="meta")
    # microsoft/Phi-3-mini-4k-instruct: 3,821,079,552 parameters.
    assert sum(p.numel() for p in model.parameters()) == 3_821_079_552
