"""Gemma 3 text against transformers: 5:1 sliding/global layers (checked past the window),
per-head q/k norms, a rotary base per layer kind (with linear scaling on the global layers)."""

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
    model_from_hf_config,
    parse_hf_config,
)
from protoformer.recipes import get_preset  # noqa: E402
from tests.architectures import hf_testkit as kit  # noqa: E402

# 7 layers: 0-4 and 6 slide over 5 positions (base 100), layer 5 is global (base 1e4, linear
# scaling by 2); 24 compared and 26 generated tokens run past the window.
SIZES = {"vocab_size": kit.VOCAB, "hidden_size": 48, "intermediate_size": 96,
         "num_hidden_layers": 7, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
         "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
         "query_pre_attn_scalar": 20, "sliding_window": 5,
         "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                             "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                "rope_theta": 10000.0}}}


def gemma3(**overrides: Any) -> Any:
    from transformers import Gemma3TextConfig

    return kit.build_hf(Gemma3TextConfig(**{**SIZES, **overrides}), seed=23, norm_center=0.0)


def test_gemma3_matches_transformers(tmp_path: Path) -> None:
    ours = kit.check_family(gemma3(), tmp_path)
    layers = list(ours.decoder.layers)
    assert [layer.self_attention.window_size for layer in layers] == [5] * 5 + [None, 5]
    assert ours.config.qk_layernorm and ours.config.rope_scaling == "linear"
    assert layers[0].self_attention.rotary_pos_emb.rotary_base == 100.0
    assert layers[5].self_attention.rotary_pos_emb is None  # the model's table


def test_gemma3_local_rotary_base_matters() -> None:
    # Guards the test above: rotating the sliding layers with the global table differs.
    hf_model = gemma3()
    ours = from_hf(hf_model)
    for layer in ours.decoder.layers:
        layer.self_attention.rotary_pos_emb = None
    assert kit.max_logit_difference(hf_model, ours) > 1e-3


def test_gemma3_hub_config_layout() -> None:
    # The hub's config.json keys: rope_theta, rope_local_base_freq, rope_scaling, and
    # sliding_window_pattern instead of layer_types.
    values = {**gemma3().config.to_dict(), "rope_theta": 5000.0, "rope_local_base_freq": 50.0,
              "rope_scaling": {"rope_type": "linear", "factor": 4.0},
              "sliding_window_pattern": 3}
    del values["rope_parameters"], values["layer_types"]
    info = parse_hf_config(values)
    assert info.config.rotary_base == 5000.0 and info.config.rope_scaling_factor == 4.0
    built = model_from_hf_config(values)  # the layers only: no weights needed
    windows = [layer.self_attention.window_size for layer in built.decoder.layers]
    assert windows == [5, 5, None, 5, 5, None, 5]
    assert built.decoder.layers[0].self_attention.rotary_pos_emb.rotary_base == 50.0


def test_gemma3_preset_and_refusals() -> None:
    model = get_preset("gemma3-1b").build_model(device="meta")
    assert [layer.self_attention.window_size for layer in model.decoder.layers[:6]] \
        == [512] * 5 + [None]
    values = gemma3().config.to_dict()
    with pytest.raises(UnsupportedHFModelError, match="multimodal"):
        parse_hf_config({**values, "model_type": "gemma3"})
    yarn = {"full_attention": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    with pytest.raises(UnsupportedHFModelError, match="yarn"):
        parse_hf_config({**values, "rope_parameters": yarn})


def test_gemma3_layer_rotary_table_survives_to_empty() -> None:
    # A model built on the meta device gets its own per-layer tables back from init_weights.
    import torch

    built = model_from_hf_config(gemma3().config.to_dict())
    expected = built.decoder.layers[0].self_attention.rotary_pos_emb.inv_freq.clone()
    assert torch.allclose(expected, 100.0 ** (-torch.arange(0, 16, 2) / 16))
    with torch.device("meta"):
        empty = model_from_hf_config(gemma3().config.to_dict())
    empty.to_empty(device="cpu")
    empty.init_weights()
    assert torch.equal(empty.decoder.layers[0].self_attention.rotary_pos_emb.inv_freq, expected)


def test_gemma3_decoding_cache_of_sliding_layers_stays_at_the_window() -> None:
    import torch

    from protoformer.transformer.inference import InferenceContext

    ours = from_hf(gemma3()).eval()
    ids = kit.token_ids(1, 30, seed=3)
    context = InferenceContext(max_batch_size=1, max_sequence_length=64)
    with torch.no_grad():
        full = ours(ids)
        steps = [ours(ids[:, :3], inference_context=context)]
        for position in range(3, 30):
            steps.append(ours(ids[:, position:position + 1], inference_context=context))
            sizes = {number: sum(t.numel() for t in pair)
                     for number, pair in context.key_value_memory_dict.items()}
            # Keys and values of one 16-wide group: a sliding layer holds 5 positions, the
            # global layer (number 6) a slot for each of the context's 64.
            assert sizes == {number: 2 * 16 * (64 if number == 6 else 5)
                             for number in range(1, 8)}
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4


def test_gemma3_batched_static_decoding_matches_transformers() -> None:
    # generate_batch's static-shape step: per-layer rotary tables and windows in its mask.
    import torch

    from protoformer.generation import generate_batch

    hf_model = gemma3()
    ours = from_hf(hf_model).eval()
    prompts = [kit.token_ids(1, 6, seed=2)[0].tolist(), kit.token_ids(1, 3, seed=4)[0].tolist()]
    batched = generate_batch(ours, prompts, 10, greedy=True)
    with torch.no_grad():
        for prompt, got in zip(prompts, batched, strict=True):
            out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)
            assert got == out[0, len(prompt):].tolist()
