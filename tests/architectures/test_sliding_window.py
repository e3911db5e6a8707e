"""Sliding-window attention converted from Mistral and Qwen2: exact past the window, and a
decoding cache that stops growing at the window."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="Hugging Face transformers is not installed")

from protoformer.interop import from_hf  # noqa: E402
from protoformer.transformer.attention import SelfAttention  # noqa: E402
from tests.architectures import hf_testkit as kit  # noqa: E402

WINDOW = 6
SIZES = {"vocab_size": kit.VOCAB, "hidden_size": 64, "intermediate_size": 112,
         "num_hidden_layers": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
         "num_attention_heads": 4, "num_key_value_heads": 2}


def mistral() -> Any:
    from transformers import MistralConfig

    return kit.build_hf(MistralConfig(**SIZES, sliding_window=WINDOW), seed=11)


def qwen2_second_layer_slides() -> Any:
    from transformers import Qwen2Config

    config = Qwen2Config(**SIZES, use_sliding_window=True, sliding_window=WINDOW,
                         max_window_layers=1)
    assert config.layer_types == ["full_attention", "sliding_attention"]
    return kit.build_hf(config, seed=12)


@pytest.mark.parametrize("build", [mistral, qwen2_second_layer_slides])
def test_windowed_models_match_transformers_past_the_window(build: Any, tmp_path: Path) -> None:
    hf_model = build()
    ours = kit.check_family(hf_model, tmp_path)  # 24-token logits, 20 generated tokens > W = 6
    assert ours.max_sequence_length == SIZES["max_position_embeddings"]  # no cap at the window
    windows = [layer.self_attention.window_size for layer in ours.decoder.layers
               if isinstance(layer.self_attention, SelfAttention)]
    assert windows == ([WINDOW, WINDOW] if build is mistral else [None, WINDOW])


def test_the_window_changes_the_logits_past_it() -> None:
    # Guards the test above: without the window the model would differ from transformers.
    hf_model = mistral()
    wide = kit.build_hf(type(hf_model.config)(**{**SIZES, "sliding_window": None}), seed=11)
    wide.load_state_dict(hf_model.state_dict())
    assert kit.max_logit_difference(wide, from_hf(hf_model)) > 1e-2


def test_decoding_cache_stays_at_the_window() -> None:
    from protoformer.transformer.inference import InferenceContext

    ours = from_hf(mistral()).eval()
    ids = kit.token_ids(1, 40, seed=3)
    context = InferenceContext(max_batch_size=1, max_sequence_length=64)
    sizes: list[int] = []
    with torch.no_grad():
        full = ours(ids)
        steps = [ours(ids[:, :4], inference_context=context)]
        for position in range(4, 40):
            steps.append(ours(ids[:, position:position + 1], inference_context=context))
            sizes.append(sum(t.numel() for pair in context.key_value_memory_dict.values()
                             for t in pair))
    decoded = torch.cat(steps, dim=1)
    assert (decoded - full).abs().max().item() <= 1e-5
    groups, head_dim = 2, 16
    per_layer = 2 * WINDOW * groups * head_dim  # keys and values of W positions
    assert set(sizes) == {2 * per_layer}  # two layers; the same after 5 and after 40 tokens


def test_batched_static_decoding_applies_the_window() -> None:
    # generate_batch runs the static-shape step (full-length cache, the window in its mask).
    from transformers import MistralForCausalLM

    from protoformer.generation import generate_batch

    hf_model = mistral()
    assert isinstance(hf_model, MistralForCausalLM)
    ours = from_hf(hf_model).eval()
    prompts = [kit.token_ids(1, 6, seed=2)[0].tolist(), kit.token_ids(1, 3, seed=4)[0].tolist()]
    batched = generate_batch(ours, prompts, 16, greedy=True)
    with torch.no_grad():
        for prompt, got in zip(prompts, batched, strict=True):
            out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)
            assert got == out[0, len(prompt):].tolist()
