"""Llama with rope_scaling "linear" and "dynamic" (NTK), against transformers."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="Hugging Face transformers is not installed")

from protoformer.interop import from_hf  # noqa: E402
from tests.architectures import hf_testkit as kit  # noqa: E402

# Dynamic: max_position_embeddings 16, so the 24-token logits and 26-token generations pass it
# and the base changes inside the tests. Linear: 32 (its configs state the stretched length).
SIZES = {"vocab_size": kit.VOCAB, "hidden_size": 64, "intermediate_size": 112,
         "num_hidden_layers": 2, "max_position_embeddings": 16, "rms_norm_eps": 1e-5,
         "num_attention_heads": 4, "num_key_value_heads": 2}


def llama(rope_type: str) -> Any:
    from transformers import LlamaConfig

    rope = {"rope_type": rope_type, "factor": 2.0, "rope_theta": 10000.0}
    length = 16 if rope_type == "dynamic" else 32
    return kit.build_hf(LlamaConfig(**{**SIZES, "max_position_embeddings": length},
                                    rope_parameters=rope), seed=len(rope_type))


@pytest.mark.parametrize("rope_type", ["linear", "dynamic"])
def test_scaled_rope_matches_transformers(rope_type: str, tmp_path: Path) -> None:
    hf_model = llama(rope_type)
    ours = kit.check_family(hf_model, tmp_path)
    assert ours.config.rope_scaling == rope_type and ours.config.rope_scaling_factor == 2.0


@pytest.mark.parametrize("rope_type", ["linear", "dynamic"])
def test_the_scaling_changes_the_logits(rope_type: str) -> None:
    from transformers import LlamaConfig

    hf_model = llama(rope_type)
    plain = kit.build_hf(LlamaConfig(**{**SIZES, "max_position_embeddings": 64}), seed=0)
    plain.load_state_dict(hf_model.state_dict())
    assert kit.max_logit_difference(plain, from_hf(hf_model)) > 1e-3


def test_native_dynamic_model_exports_its_original_length() -> None:
    from protoformer.interop import hf_config_dict

    ours = from_hf(llama("dynamic"))
    assert ours.max_sequence_length == 32  # 16 trained positions stretched by factor 2
    values = hf_config_dict(ours)
    assert values["max_position_embeddings"] == 16
