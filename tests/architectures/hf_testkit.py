"""Shared checks of a family against transformers: tiny random-init models built offline.

Imported as `tests.architectures.hf_testkit` (pytest puts the repository root on sys.path).
Every numeric check compares protoformer with the transformers model holding the same weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from protoformer.generation import generate
from protoformer.interop import from_hf, save_hf, to_hf
from protoformer.models import GPTModel
from protoformer.transformer.masks import padding_mask_from_attention_mask

VOCAB = 96
LOGIT_ATOL = 1e-4


def randomize(model: nn.Module, seed: int, *, norm_center: float = 1.0) -> None:
    """Weights large enough that the logits of a tiny model are far from uniform; norm scales
    near `norm_center` (0 for the `(1 + w)` norms of Gemma)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(norm_center + 0.1 * noise)
            else:
                param.copy_(0.15 * noise)


def build_hf(config: Any, seed: int, *, norm_center: float = 1.0) -> Any:
    """A transformers causal LM of `config` (float32, eval mode) with random weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, seed, norm_center=norm_center)
    return model.eval()


def token_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_logit_difference(hf_model: Any, ours: GPTModel, length: int = 24) -> float:
    """Largest |difference| of the logits on a left-padded batch (row 1 has 5 padding tokens),
    over the positions that are not padding."""
    ids = token_ids(2, length)
    keep = torch.ones(2, length, dtype=torch.long)
    keep[1, :5] = 0
    with torch.no_grad():
        expected = hf_model(ids, attention_mask=keep).logits
        got = ours.eval()(ids, attention_mask=padding_mask_from_attention_mask(keep))
    assert got.shape == expected.shape
    real = keep.bool()
    return (got - expected).abs()[real].max().item()


def assert_same_logits(hf_model: Any, ours: GPTModel, length: int = 24) -> None:
    assert max_logit_difference(hf_model, ours, length) <= LOGIT_ATOL


def assert_same_greedy_generation(hf_model: Any, ours: GPTModel, new_tokens: int = 20) -> None:
    prompt = token_ids(1, 6, seed=2)
    with torch.no_grad():
        out = hf_model.generate(prompt, max_new_tokens=new_tokens, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
    expected = out[0, prompt.shape[1]:].tolist()
    assert len(expected) == new_tokens
    assert generate(ours, prompt[0], new_tokens, greedy=True) == expected


def assert_exact_round_trip(hf_model: Any, ours: GPTModel) -> None:
    expected = hf_model.state_dict()
    exported = to_hf(ours)
    assert sorted(exported) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(exported[name], tensor), name


def assert_export_loads(hf_model: Any, ours: GPTModel, directory: Path) -> None:
    """`save_hf` writes a directory `from_pretrained` loads as the same class and weights."""
    from transformers import AutoModelForCausalLM

    save_hf(ours, directory)
    # The reference's attention implementation, not the loader's default: transformers 5.17
    # picks SDPA for Gemma 2, which does not soft-cap (5.24 picks eager).
    reloaded = AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation=hf_model.config._attn_implementation).eval()
    assert type(reloaded) is type(hf_model)
    for name, tensor in hf_model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    assert_same_logits(reloaded, ours)
    # `reloaded`, not `hf_model`: transformers' dynamic rope keeps the longest length a model
    # has seen (hf_model generated 26 tokens), so only a model run at this length compares.
    assert_same_logits(reloaded, from_hf(directory))


def check_family(hf_model: Any, tmp_path: Path) -> GPTModel:
    """Every check of the issue's list for one converted model; returns protoformer's model."""
    ours = from_hf(hf_model)
    assert_same_logits(hf_model, ours)
    assert_same_greedy_generation(hf_model, ours)
    assert_exact_round_trip(hf_model, ours)
    assert_export_loads(hf_model, ours, tmp_path)
    return ours
