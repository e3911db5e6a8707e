"""GPT-NeoX against transformers: parallel residual, partial rotary, LayerNorm with bias,
biases on every linear, the per-head fused query_key_value, GeLU."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="Hugging Face transformers is not installed")

from protoformer.interop import (  # noqa: E402
    UnsupportedHFModelError,
    from_hf,
    hf_model_info,
    parse_hf_config,
)
from protoformer.recipes import get_preset  # noqa: E402
from tests.architectures import hf_testkit as kit  # noqa: E402

# 4 heads of 16; rotary over the first quarter of each head (4 channels).
SIZES = {"vocab_size": kit.VOCAB, "hidden_size": 64, "intermediate_size": 112,
         "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64,
         "hidden_act": "gelu", "rope_parameters": {"rope_type": "default", "rope_theta": 800.0,
                                                    "partial_rotary_factor": 0.25},
         "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def neox(**overrides: Any) -> Any:
    from transformers import GPTNeoXConfig

    return kit.build_hf(GPTNeoXConfig(**{**SIZES, **overrides}), seed=41)


@pytest.mark.parametrize("parallel", [True, False])
def test_gpt_neox_matches_transformers(parallel: bool, tmp_path: Path) -> None:
    ours = kit.check_family(neox(use_parallel_residual=parallel), tmp_path)
    config = ours.config
    assert config.rotary_percent == 0.25 and config.normalization == "LayerNorm"
    assert config.add_bias_linear and not config.gated_linear_unit
    assert {layer.parallel_residual for layer in ours.decoder.layers} == {parallel}


def test_without_the_parallel_residual_the_logits_differ() -> None:
    # Guards the test above: the residual arrangement changes the numbers.
    hf_model = neox(use_parallel_residual=True)
    ours = from_hf(hf_model)
    for layer in ours.decoder.layers:
        layer.parallel_residual = False
    assert kit.max_logit_difference(hf_model, ours) > 1e-2


def test_a_config_with_the_other_residual_does_not_describe_the_model() -> None:
    ours = from_hf(neox(use_parallel_residual=False))
    other = {**neox().config.to_dict(), "use_parallel_residual": True}
    with pytest.raises(ValueError, match="parallel_residual: model \\[False\\], config \\[True\\]"):
        hf_model_info(ours, other)


def test_older_config_keys_are_read() -> None:
    values = {**neox().config.to_dict()}
    values.pop("rope_parameters")
    values.update(rotary_pct=0.5, rotary_emb_base=500)
    config = parse_hf_config(values).config
    assert config.rotary_percent == 0.5 and config.rotary_base == 500.0
    values.pop("rotary_pct")
    assert parse_hf_config(values).config.rotary_percent == 0.25  # transformers' default


def test_unsupported_gpt_neox_features_are_named() -> None:
    values = neox().config.to_dict()
    with pytest.raises(UnsupportedHFModelError, match="attention_bias=false"):
        parse_hf_config({**values, "attention_bias": False})
    with pytest.raises(UnsupportedHFModelError, match=r"rope_type='linear'.*gpt_neox"):
        parse_hf_config({**values, "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                       "rope_theta": 10000.0}})


def test_pythia_1b_preset_has_the_published_parameter_count() -> None:
    model = get_preset("pythia-1b").build_model(device="meta")
    assert all(layer.parallel_residual for layer in model.decoder.layers)
    # EleutherAI/pythia-1b: 1,011,781,632 parameters.
    assert sum(p.numel() for p in model.parameters()) == 1_011_781_632


def test_an_older_checkpoint_file_with_embed_out_and_mask_buffers_loads(tmp_path: Path) -> None:
    # transformers 4 era files (Pythia on the hub): the head is `embed_out.weight` and each
    # layer may store its causal-mask buffers; half precision, which from_hf keeps.
    import json

    import torch
    from safetensors.torch import save_file

    hf_model = neox()
    state = {name: tensor.half() for name, tensor in hf_model.state_dict().items()}
    state["embed_out.weight"] = state.pop("lm_head.weight")
    for index in range(2):
        state[f"gpt_neox.layers.{index}.attention.bias"] = torch.ones(1, 1, 64, 64).tril()
        state[f"gpt_neox.layers.{index}.attention.masked_bias"] = torch.tensor(-1e9)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(hf_model.config.to_dict()))
    with pytest.warns(UserWarning, match="not loading 4 tensor"):
        ours = from_hf(tmp_path)
    assert ours.embedding.weight.dtype == torch.float16
    assert torch.equal(ours.output_layer.weight, state["embed_out.weight"])
