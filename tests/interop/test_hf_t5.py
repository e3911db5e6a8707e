"""Hugging Face T5 interop: tiny random-init `T5ForConditionalGeneration` models, both ways.

Numeric checks compare protoformer's `T5Model` with the transformers model holding the same
weights (logits and loss in float32, greedy generations); round trips compare tensors exactly.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="Hugging Face transformers is not installed")

from protoformer.generation import generate_seq2seq  # noqa: E402
from protoformer.interop import (  # noqa: E402
    HFConversionError,
    UnsupportedHFModelError,
    from_hf,
    save_t5_hf,
    t5_from_hf,
    t5_to_hf,
)
from protoformer.models import T5Model  # noqa: E402

VOCAB = 96
LOGIT_ATOL = 1e-4
# Non-default shapes: d_kv not d_model / heads, a deeper decoder than encoder, few buckets so
# that the logarithmic buckets are reached inside short test sequences.
BASE = {"vocab_size": VOCAB, "d_model": 32, "d_kv": 12, "d_ff": 40, "num_layers": 2,
        "num_decoder_layers": 3, "num_heads": 4, "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 20, "dropout_rate": 0.0, "decoder_start_token_id": 0}
VARIANTS = {
    "t5": {"feed_forward_proj": "relu"},  # tied head, scaled decoder output
    "t5-v1.1": {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
    # mT5: the T5 v1.1 layout; transformers 5 ties its head and never scales the output.
    "mt5": {"feed_forward_proj": "gated-gelu"},
}
HF_CLASSES = {"t5": "T5ForConditionalGeneration", "t5-v1.1": "T5ForConditionalGeneration",
              "mt5": "MT5ForConditionalGeneration"}


def hf_t5(variant: str, *, seed: int = 0, std: float = 0.3) -> Any:
    import transformers

    config_class = transformers.MT5Config if variant == "mt5" else transformers.T5Config
    config = config_class(**BASE, **VARIANTS[variant])
    torch.manual_seed(seed)
    model = getattr(transformers, HF_CLASSES[variant])(config).eval()
    with torch.no_grad():  # larger weights than T5's init: outputs far from uniform
        for parameter in model.parameters():
            parameter.normal_(0.0, std)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    encoder_ids = torch.randint(2, VOCAB, (2, 30), generator=generator)
    decoder_ids = torch.randint(2, VOCAB, (2, 25), generator=generator)
    attention_mask = torch.ones(2, 30, dtype=torch.long)
    attention_mask[1, 21:] = 0  # the second row is padded
    return encoder_ids, decoder_ids, attention_mask


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_loss_match_transformers(variant: str) -> None:
    hf = hf_t5(variant)
    model = t5_from_hf(hf).eval()
    assert model.scale_decoder_outputs == (variant == "t5")
    encoder_ids, decoder_ids, attention_mask = batch()
    with torch.no_grad():
        expected = hf(input_ids=encoder_ids, attention_mask=attention_mask,
                      decoder_input_ids=decoder_ids).logits
        got = model(encoder_ids, decoder_ids, encoder_padding_mask=attention_mask == 0)
        # transformers shifts the labels right to make the decoder input and averages the loss.
        hf_loss = hf(input_ids=encoder_ids, attention_mask=attention_mask, labels=decoder_ids).loss
        shifted = torch.cat([torch.zeros(2, 1, dtype=torch.long), decoder_ids[:, :-1]], dim=1)
        loss = model(encoder_ids, shifted, decoder_ids, encoder_padding_mask=attention_mask == 0)
    assert got.shape == expected.shape == (2, 25, VOCAB)
    assert (got - expected).abs().max() <= LOGIT_ATOL
    torch.testing.assert_close(loss.mean(), hf_loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("variant", "std"), [("t5", 0.3), ("t5-v1.1", 0.6), ("mt5", 0.6)])
def test_greedy_generation_matches_transformers(variant: str, std: float) -> None:
    hf = hf_t5(variant, seed=2, std=std)  # weights whose greedy output is not one repeated token
    model = t5_from_hf(hf).eval()
    source = torch.randint(2, VOCAB, (1, 17), generator=torch.Generator().manual_seed(3))
    # transformers' own cache handles a decoder deeper than the encoder badly: compare
    # against its uncached decoding.
    hf.generation_config.eos_token_id = None  # 20 tokens, the end-of-sequence id included
    expected = hf.generate(source, max_new_tokens=20, do_sample=False,
                           use_cache=False)[0, 1:].tolist()
    assert len(expected) == 20
    got = generate_seq2seq(model, source[0], 20, greedy=True)
    assert len(set(expected)) >= 3, "degenerate reference; pick other weights"
    assert got == expected


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_reproduces_every_tensor(variant: str) -> None:
    hf = hf_t5(variant)
    state = hf.state_dict()
    back = t5_to_hf(t5_from_hf(hf))
    assert set(back) == set(state)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_saved_directory_loads_in_transformers_and_back(variant: str, tmp_path: Path) -> None:
    import transformers

    hf = hf_t5(variant)
    model = t5_from_hf(hf).eval()
    save_t5_hf(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == \
        [HF_CLASSES[variant]]
    reloaded = getattr(transformers, HF_CLASSES[variant]).from_pretrained(tmp_path).eval()
    again = t5_from_hf(tmp_path).eval()
    assert isinstance(again, T5Model)
    encoder_ids, decoder_ids, attention_mask = batch()
    with torch.no_grad():
        expected = hf(input_ids=encoder_ids, attention_mask=attention_mask,
                      decoder_input_ids=decoder_ids).logits
        from_transformers = reloaded(input_ids=encoder_ids, attention_mask=attention_mask,
                                     decoder_input_ids=decoder_ids).logits
        from_directory = again(encoder_ids, decoder_ids, encoder_padding_mask=attention_mask == 0)
    torch.testing.assert_close(from_transformers, expected, atol=1e-5, rtol=1e-5)
    assert (from_directory - expected).abs().max() <= LOGIT_ATOL


def test_missing_and_extra_tensors_are_listed(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = t5_from_hf(hf_t5("t5"))
    save_t5_hf(model, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["decoder.block.1.layer.1.EncDecAttention.k.weight"]
    tensors["encoder.block.0.layer.0.SelfAttention.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(HFConversionError, match=r"(?s)missing \(1\):\s+decoder\.block\.1\.layer\.1"
                                                r"\.EncDecAttention\.k\.weight.*unexpected \(1\):\s+"
                                                r"encoder\.block\.0\.layer\.0\.SelfAttention\.extra"):
        t5_from_hf(tmp_path)


def test_from_hf_points_t5_to_t5_from_hf() -> None:
    with pytest.raises(UnsupportedHFModelError, match="t5_from_hf"):
        from_hf(hf_t5("t5"))


def test_a_model_transformers_cannot_express_is_refused() -> None:
    from protoformer import TransformerConfig
    from protoformer.backends import get_backend
    from protoformer.recipes import t5_decoder_layer_spec, t5_encoder_layer_spec

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                               normalization="RMSNorm", add_bias_linear=False, softmax_scale=1.0)
    backend = get_backend("local")
    untied_but_scaled = T5Model(config, t5_encoder_layer_spec(backend, config),
                                t5_decoder_layer_spec(backend, config), VOCAB, 32,
                                share_embeddings_and_output_weights=False,
                                scale_decoder_outputs=True)
    with pytest.raises(UnsupportedHFModelError, match="scale_decoder_outputs=True"):
        t5_to_hf(untied_but_scaled)
    rope = T5Model(config, t5_encoder_layer_spec(backend, config),
                   t5_decoder_layer_spec(backend, config), VOCAB, 32,
                   position_embedding_type="rope")
    with pytest.raises(UnsupportedHFModelError, match="position_embedding_type='rope'"):
        t5_to_hf(rope)
