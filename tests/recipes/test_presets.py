"""Presets: lookup, shapes of the real-size presets (meta device), tiny presets that run."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from protoformer import MLATransformerConfig
from protoformer.backends import LocalSpecProvider
from protoformer.flops import flops_per_token
from protoformer.models import GPTModel
from protoformer.recipes import Preset, get_preset, list_presets


def test_list_presets_names_every_preset() -> None:
    assert list_presets() == ["tiny", "tiny-gqa", "tiny-mla", "tiny-moe", "tiny-tied", "llama3-8b",
                              "llama3-70b", "deepseek-v3-mla", "gemma-2b", "pythia-1b",
                              "phi3-mini-4k", "gemma2-2b", "gemma3-1b", "olmo2-1b",
                              "mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3"]
    for name in list_presets():
        preset = get_preset(name)
        assert isinstance(preset, Preset) and preset.name == name and preset.description


def test_unknown_preset_error_lists_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown preset 'gpt5'.*tiny, tiny-gqa"):
        get_preset("gpt5")


def test_preset_is_frozen_and_configs_are_fresh() -> None:
    preset = get_preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset.vocab_size = 3  # type: ignore[misc]
    assert preset.config() is not preset.config()


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa", "tiny-mla"])
def test_tiny_presets_train_one_step(name: str) -> None:
    torch.manual_seed(0)
    preset = get_preset(name)
    model = preset.build_model(LocalSpecProvider())
    assert isinstance(model, GPTModel) and model.vocab_size == 256
    ids = torch.randint(0, 256, (2, 17))
    loss = model(ids[:, :-1], ids[:, 1:]).mean()
    assert 4.0 < loss.item() < 7.0  # about ln(256) = 5.55 at initialisation
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_tiny_preset_is_llama_like() -> None:
    config = get_preset("tiny").config()
    assert config.normalization == "RMSNorm" and config.gated_linear_unit
    assert not config.add_bias_linear
    assert get_preset("tiny").max_sequence_length == 256
    gqa = get_preset("tiny-gqa").config()
    assert gqa.query_groups < gqa.num_attention_heads and gqa.qk_layernorm
    assert isinstance(get_preset("tiny-mla").config(), MLATransformerConfig)


def test_llama3_8b_shapes_and_parameter_count_on_meta() -> None:
    preset = get_preset("llama3-8b")
    config = preset.config()
    assert (config.num_layers, config.hidden_size, config.ffn_size) == (32, 4096, 14336)
    assert (config.num_attention_heads, config.query_groups) == (32, 8)
    assert config.rotary_base == 500000.0 and config.rope_scaling == "llama3"
    assert config.layernorm_epsilon == 1e-5
    model = preset.build_model(device="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    h, v, f, kv = 4096, 128256, 14336, 8 * 128
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    assert sum(p.numel() for p in model.parameters()) == 2 * v * h + h + 32 * per_layer
    assert not preset.tie_embeddings and model.output_layer.weight is not None


def test_deepseek_v3_mla_parameter_count_on_meta() -> None:
    preset = get_preset("deepseek-v3-mla")
    config = preset.config()
    assert isinstance(config, MLATransformerConfig)
    model = preset.build_model(device="meta")
    h, heads, ffn, vocab = 7168, 128, 18432, 129280
    q = h * 1536 + 1536 + 1536 * heads * (128 + 64)  # down, norm, up
    kv = h * (512 + 64) + 512 + 512 * heads * (128 + 128)  # down (+ rope key), norm, up
    proj = heads * 128 * h
    per_layer = q + kv + proj + 3 * h * ffn + 2 * h
    assert sum(p.numel() for p in model.parameters()) == 2 * vocab * h + h + 61 * per_layer


def test_flops_of_llama3_8b_is_about_six_times_parameters() -> None:
    config = get_preset("llama3-8b").config()
    flops = flops_per_token(config, 128256, 8192)
    non_embedding = 8.03e9 - 128256 * 4096  # the embedding lookup does no matmul
    assert 6 * non_embedding < flops < 6 * non_embedding * 1.3  # + attention at 8k context
