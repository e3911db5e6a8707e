"""Per-layer block specs: a `TransformerBlock` / `GPTModel` built from one spec per layer.

The reference is the naive pre-norm layer of `test_layer.py` (einsum attention, explicit
norms), applied layer by layer with the norm kind each layer was given.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from protoformer.backends import get_backend
from protoformer.models import GPTModel
from protoformer.recipes import gpt_layer_spec, layer_pattern_from_freq, layer_specs_from_pattern
from protoformer.transformer.block import TransformerBlock, per_layer_specs
from protoformer.transformer.layer import TransformerLayer, TransformerLayerSubmodules
from protoformer.transformer.norm import LayerNorm, RMSNorm
from protoformer.transformer.rope import rotary_emb_from_config
from tests.transformer.test_layer import (
    GPT2_LIKE,
    TOL,
    make_config,
    naive_layer,
    naive_norm,
    randomize,
)


def _rms_and_layernorm_specs() -> tuple[TransformerLayerSubmodules, TransformerLayerSubmodules]:
    config = make_config(**GPT2_LIKE)
    backend = get_backend("local")
    layernorm = gpt_layer_spec(backend, config)
    rms = dataclasses.replace(layernorm, input_layernorm=backend.layer_norm(rms_norm=True),
                              pre_mlp_layernorm=backend.layer_norm(rms_norm=True))
    return layernorm, rms


def test_block_with_a_list_builds_each_layer_from_its_own_spec() -> None:
    config = make_config(**GPT2_LIKE, num_layers=4)
    layernorm, rms = _rms_and_layernorm_specs()
    specs = [rms, layernorm, layernorm, rms]
    block = TransformerBlock(config, specs).eval()
    randomize(block)
    kinds = [type(layer.input_layernorm) for layer in block.layers]  # type: ignore[union-attr]
    assert kinds == [RMSNorm, LayerNorm, LayerNorm, RMSNorm]
    assert [layer.layer_number for layer in block.layers] == [1, 2, 3, 4]  # type: ignore[union-attr]
    assert isinstance(block.final_layernorm, RMSNorm)  # the last layer's norm kind
    assert block.layer_specs == specs

    x = torch.randn(5, 2, 32)
    rotary = rotary_emb_from_config(config)(5)
    as_rms = dataclasses.replace(config, normalization="RMSNorm")
    expected = x
    for spec, layer in zip(specs, block.layers, strict=True):
        assert isinstance(layer, TransformerLayer)
        expected = naive_layer(expected, layer, as_rms if spec is rms else config)
    expected = naive_norm(expected, block.final_layernorm, as_rms)
    torch.testing.assert_close(block(x, rotary_pos_emb=rotary), expected, **TOL)


def test_one_spec_and_a_list_of_the_same_spec_build_the_same_block() -> None:
    config = make_config(**GPT2_LIKE, num_layers=3)
    spec, _ = _rms_and_layernorm_specs()
    torch.manual_seed(0)
    single = TransformerBlock(config, spec)
    torch.manual_seed(0)
    listed = TransformerBlock(config, (spec, spec, spec))
    assert single.state_dict().keys() == listed.state_dict().keys()
    for key, value in single.state_dict().items():
        torch.testing.assert_close(listed.state_dict()[key], value, atol=0, rtol=0)


def test_gpt_model_takes_a_spec_per_layer() -> None:
    config = make_config(**GPT2_LIKE, num_layers=2)
    layernorm, rms = _rms_and_layernorm_specs()
    model = GPTModel(config, [layernorm, rms], vocab_size=50, max_sequence_length=16)
    kinds = [type(layer.input_layernorm) for layer in model.decoder.layers]  # type: ignore[union-attr]
    assert kinds == [LayerNorm, RMSNorm]
    assert model(torch.randint(0, 50, (2, 6))).shape == (2, 6, 50)


def test_a_list_of_the_wrong_length_is_refused_with_the_counts() -> None:
    config = make_config(**GPT2_LIKE, num_layers=3)
    spec, _ = _rms_and_layernorm_specs()
    with pytest.raises(ValueError, match=r"got 2 layer spec\(s\) for config.num_layers=3"):
        TransformerBlock(config, [spec, spec])
    with pytest.raises(ValueError, match=r"GPTModel|TransformerBlock: got 4"):
        GPTModel(config, [spec] * 4, vocab_size=50, max_sequence_length=16)


def test_a_wrong_element_is_refused_naming_its_index() -> None:
    config = make_config(**GPT2_LIKE, num_layers=2)
    spec, _ = _rms_and_layernorm_specs()
    mlp_submodules = spec.mlp.keywords["submodules"]  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match=r"layer_spec\[1\] is a MLPSubmodules"):
        TransformerBlock(config, [spec, mlp_submodules])
    with pytest.raises(TypeError, match=r"got dict"):
        TransformerBlock(config, {"layers": spec})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"layer_spec\[0\] is a str"):
        per_layer_specs(["gpt"], 1)  # type: ignore[list-item]


def test_layer_pattern_from_freq_reads_megatron_moe_layer_freq() -> None:
    assert layer_pattern_from_freq(1, 3) == [True, True, True]
    assert layer_pattern_from_freq(2, 5) == [True, False, True, False, True]
    assert layer_pattern_from_freq([0, 1, 1, 0], 4) == [False, True, True, False]
    assert layer_pattern_from_freq(1, 5, first_k_dense=2) == [False, False, True, True, True]
    with pytest.raises(ValueError, match=r"moe_layer_freq has 3 entries for num_layers=4"):
        layer_pattern_from_freq([1, 0, 1], 4)
    with pytest.raises(ValueError, match=r"moe_layer_freq\[1\]=2"):
        layer_pattern_from_freq([1, 2], 2)
    with pytest.raises(ValueError, match=r"moe_layer_freq=0"):
        layer_pattern_from_freq(0, 2)
    with pytest.raises(ValueError, match=r"first_k_dense=3"):
        layer_pattern_from_freq(1, 2, first_k_dense=3)


def test_layer_specs_from_pattern_picks_a_choice_per_layer() -> None:
    dense, other = _rms_and_layernorm_specs()
    assert layer_specs_from_pattern([False, True, True], (dense, other)) == [dense, other, other]
    assert layer_specs_from_pattern([2, 0], (dense, other, dense)) == [dense, dense]
    with pytest.raises(ValueError, match=r"pattern\[1\]=2 does not pick one of the 2 choices"):
        layer_specs_from_pattern([0, 2], (dense, other))
