"""Hugging Face interop: tiny random-init transformers models converted both ways.

Every numeric check compares protoformer with the transformers model holding the same weights
(logits in float32, greedy generations); round trips compare tensors exactly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="Hugging Face transformers is not installed")

from protoformer.generation import generate  # noqa: E402
from protoformer.interop import (  # noqa: E402
    HFConversionError,
    UnsupportedHFModelError,
    from_hf,
    load_hf_for_cli,
    parse_hf_config,
    save_hf,
    to_hf,
)
from protoformer.models import GPTModel  # noqa: E402

VOCAB = 96
LOGIT_ATOL = 1e-4
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
        "original_max_position_embeddings": 32, "beta_fast": 32.0, "beta_slow": 1.0,
        "mscale": 1.0, "mscale_all_dim": 1.0}
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
DENSE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 112,
         "num_hidden_layers": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-5}
DEEPSEEK = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 112,
            "num_hidden_layers": 2, "num_attention_heads": 4, "kv_lora_rank": 32,
            "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12,
            "n_routed_experts": 4, "first_k_dense_replace": 2, "max_position_embeddings": 256}


def hf_config(kind: str, **overrides: Any) -> Any:
    import transformers

    classes = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
               "deepseek_v3": transformers.DeepseekV3Config}
    base = DEEPSEEK if kind == "deepseek_v3" else DENSE
    values = {**base, **overrides}
    if int(transformers.__version__.split(".")[0]) < 5 and "rope_parameters" in values:
        # transformers 4 spells the rotary settings as `rope_theta` and `rope_scaling`.
        rope = dict(values.pop("rope_parameters"))
        values["rope_theta"] = rope.pop("rope_theta", 10000.0)
        if rope.get("rope_type", "default") != "default":
            values["rope_scaling"] = rope
    return classes[kind](**values)


# name -> (model_type, config overrides); each exercises one feature of the mapping.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-gqa-llama3": ("llama", {"num_attention_heads": 4, "num_key_value_heads": 2,
                                   "rope_parameters": LLAMA3}),
    "llama-mqa-tied-head24": ("llama", {"num_attention_heads": 4, "num_key_value_heads": 1,
                                        "head_dim": 24, "tie_word_embeddings": True}),
    "mistral": ("mistral", {"num_attention_heads": 4, "num_key_value_heads": 2,
                            "sliding_window": None,
                            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    "qwen2-qkv-bias": ("qwen2", {"num_attention_heads": 4, "num_key_value_heads": 2}),
    "qwen3-qk-norm": ("qwen3", {"num_attention_heads": 4, "num_key_value_heads": 2,
                                "head_dim": 20}),
    "deepseek-q-lora-yarn": ("deepseek_v3", {"q_lora_rank": 24, "rope_parameters": YARN}),
    "deepseek-no-q-lora-yarn-halves": ("deepseek_v3", {"q_lora_rank": None,
                                                       "rope_parameters": YARN,
                                                       "rope_interleave": False}),
    "deepseek-yarn-mscale-only": ("deepseek_v3", {"q_lora_rank": 24, "rope_parameters": {
        **YARN, "mscale": 0.707, "mscale_all_dim": None}}),
    "deepseek-yarn-attention-factor": ("deepseek_v3", {"q_lora_rank": None, "rope_parameters": {
        **YARN, "mscale_all_dim": 0.5, "attention_factor": 1.1}}),
    "deepseek-q-lora-plain-rope": ("deepseek_v3", {"q_lora_rank": 24, "rope_parameters": {
        "rope_type": "default", "rope_theta": 10000.0}}),
}


def randomize(model: nn.Module, seed: int) -> None:
    """Weights large enough that the logits of a tiny model are far from uniform."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.15 * noise)


def build_hf(case: str) -> Any:
    from transformers import AutoModelForCausalLM

    kind, overrides = CASES[case]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(kind, **overrides), dtype=torch.float32)
    randomize(model, seed=sum(map(ord, case)))
    return model.eval()


def token_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(hf_model: Any, ours: GPTModel) -> None:
    ids = token_ids(2, 24)
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = ours.eval()(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= LOGIT_ATOL


def assert_same_greedy_generation(hf_model: Any, ours: GPTModel) -> None:
    prompt = token_ids(1, 6, seed=2)
    with torch.no_grad():
        out = hf_model.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None,
                                pad_token_id=0)
    expected = out[0, prompt.shape[1]:].tolist()
    assert len(expected) == 20
    assert generate(ours, prompt[0], 20, greedy=True) == expected


@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest) -> tuple[str, Any]:
    return request.param, build_hf(request.param)


def test_logits_and_greedy_generation_match_from_instance(case: tuple[str, Any]) -> None:
    _, hf_model = case
    ours = from_hf(hf_model)
    assert_same_logits(hf_model, ours)
    assert_same_greedy_generation(hf_model, ours)


def test_round_trip_reproduces_every_tensor(case: tuple[str, Any]) -> None:
    _, hf_model = case
    expected = hf_model.state_dict()
    exported = to_hf(from_hf(hf_model))
    assert sorted(exported) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(exported[name], tensor), name


def test_logits_match_from_saved_directory(case: tuple[str, Any], tmp_path: Path) -> None:
    _, hf_model = case
    hf_model.save_pretrained(tmp_path)
    assert_same_logits(hf_model, from_hf(tmp_path))


def test_sharded_checkpoint_directory(tmp_path: Path) -> None:
    hf_model = build_hf("llama-gqa-llama3")
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    ours = from_hf(str(tmp_path))
    assert_same_logits(hf_model, ours)
    assert_same_greedy_generation(hf_model, ours)


@pytest.mark.parametrize("case_name", ["llama-mqa-tied-head24", "qwen2-qkv-bias",
                                       "deepseek-no-q-lora-yarn-halves"])
@pytest.mark.parametrize("max_shard_size", [None, 30_000])
def test_save_hf_loads_in_transformers(case_name: str, max_shard_size: int | None,
                                       tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf_model = build_hf(case_name)
    ours = from_hf(hf_model)
    save_hf(ours, tmp_path, max_shard_size=max_shard_size)
    assert (tmp_path / "model.safetensors.index.json").is_file() == (max_shard_size is not None)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(hf_model)
    assert_same_logits(reloaded, ours)
    for name, tensor in hf_model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    assert_same_logits(hf_model, from_hf(tmp_path))


@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa", "tiny-mla"])
def test_native_model_exports_to_transformers(preset: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from protoformer.recipes import get_preset

    torch.manual_seed(0)
    ours = get_preset(preset).build_model()
    randomize(ours, seed=5)
    save_hf(ours, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        difference = (reloaded(ids).logits - ours.eval()(ids)).abs().max().item()
    assert difference <= LOGIT_ATOL
    exported = to_hf(ours)
    assert sorted(exported) == sorted(reloaded.state_dict())


def test_native_llama3_model_exports_with_its_rope_scaling(tmp_path: Path) -> None:
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from protoformer import TransformerConfig
    from protoformer.backends import get_backend
    from protoformer.recipes import gpt_layer_spec

    config = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=96, normalization="RMSNorm", add_bias_linear=False,
        gated_linear_unit=True, activation_func=F.silu, attention_dropout=0.0,
        hidden_dropout=0.0, rotary_base=500000.0, rope_scaling="llama3",
        rope_original_max_position_embeddings=32)
    torch.manual_seed(0)
    ours = GPTModel(config, gpt_layer_spec(get_backend("local"), config), VOCAB, 64,
                    share_embeddings_and_output_weights=True)
    randomize(ours, seed=9)
    save_hf(ours, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.rope_parameters["rope_type"] == "llama3"
    assert reloaded.config.tie_word_embeddings
    assert_same_logits(reloaded, ours)


def test_legacy_config_keys_are_read() -> None:
    legacy = {"model_type": "llama", **DENSE, "num_attention_heads": 4, "rope_theta": 500000,
              "rope_scaling": {"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}}
    config = parse_hf_config(legacy).config
    assert (config.rotary_base, config.rope_scaling, config.rope_scaling_factor) == \
        (500000.0, "llama3", 32.0)
    assert config.kv_channels == 16 and config.num_query_groups == 4


def test_weights_convert_to_the_requested_dtype(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    build_hf("qwen2-qkv-bias").to(torch.bfloat16).save_pretrained(tmp_path)
    assert from_hf(tmp_path).embedding.weight.dtype == torch.bfloat16
    ours = from_hf(tmp_path, dtype=torch.float32)
    assert ours.embedding.weight.dtype == torch.float32
    # The reference reads the bf16 file into float32 too (its rotary table stays exact).
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert_same_logits(reference, ours)


# ------------------------------------------------------------------ errors
def _rewrite_weights(directory: Path, drop: str, add: str) -> None:
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(path)
    del tensors[drop]
    tensors[add] = torch.zeros(3)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_and_unexpected_tensors_are_listed(tmp_path: Path) -> None:
    build_hf("llama-gqa-llama3").save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, drop="model.layers.1.mlp.up_proj.weight",
                     add="model.layers.0.self_attn.extra_scale")
    with pytest.raises(HFConversionError) as raised:
        from_hf(tmp_path)
    message = str(raised.value)
    assert "missing (1)" in message and "model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected (1)" in message and "model.layers.0.self_attn.extra_scale" in message


def test_a_transformers_model_without_its_lm_head_is_rejected() -> None:
    hf_model = build_hf("llama-gqa-llama3")
    with pytest.raises(HFConversionError, match="missing") as raised:
        from_hf(hf_model.model)  # the base LlamaModel: no lm_head, no "model." prefix
    assert "lm_head.weight" in str(raised.value)


def test_config_that_does_not_fit_the_weights(tmp_path: Path) -> None:
    build_hf("llama-gqa-llama3").save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config["intermediate_size"] = 100
    config_path.write_text(json.dumps(config))
    with pytest.raises(HFConversionError, match=r"linear_fc1\.weight.*\(200, 64\)"):
        from_hf(tmp_path)


def test_directory_without_safetensors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(hf_config("llama").to_dict()))
    with pytest.raises(HFConversionError, match=re.escape("no model.safetensors")):
        from_hf(tmp_path)


def test_unsupported_architecture_names_it_and_the_supported_ones() -> None:
    with pytest.raises(UnsupportedHFModelError) as raised:
        parse_hf_config({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    message = str(raised.value)
    assert "gpt2" in message and "GPT2LMHeadModel" in message
    for supported in ("llama", "mistral", "qwen2", "qwen3", "deepseek_v3"):
        assert supported in message


def test_unsupported_features_are_named() -> None:
    yarn_rope = hf_config("llama", num_attention_heads=4, rope_parameters=YARN)
    with pytest.raises(UnsupportedHFModelError, match="rope_type='yarn'"):
        parse_hf_config(yarn_rope)
    attention_bias_only = hf_config("llama", num_attention_heads=4, attention_bias=True)
    with pytest.raises(UnsupportedHFModelError, match="o_proj=True, MLP=False"):
        parse_hf_config(attention_bias_only)
    with pytest.raises(UnsupportedHFModelError, match="hidden_act='quick_gelu'"):
        parse_hf_config(hf_config("llama", num_attention_heads=4, hidden_act="quick_gelu"))


def test_inconsistent_sizes_name_the_config_field() -> None:
    config = {"model_type": "qwen2", **DENSE, "num_attention_heads": 4, "num_key_value_heads": 3}
    with pytest.raises(HFConversionError, match=r"Qwen2ForCausalLM config.*num_query_groups=3"):
        parse_hf_config(config)


def test_to_hf_rejects_a_config_of_another_shape() -> None:
    ours = from_hf(build_hf("qwen2-qkv-bias"))
    other = hf_config("qwen2", num_attention_heads=4, num_key_value_heads=4)
    with pytest.raises(ValueError, match="num_query_groups: model 2, config 4"):
        to_hf(ours, config=other)


# ------------------------------------------------------------------ command line support
def test_load_hf_for_cli_reads_tokenizer_and_stop_tokens(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from protoformer.interop.hf_tokenizer import StreamDecoder

    hf_model = build_hf("llama-gqa-llama3")
    hf_model.generation_config.eos_token_id = [2, 3]
    hf_model.save_pretrained(tmp_path)
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "tokenizer.json"))

    loaded = load_hf_for_cli(tmp_path, device="cpu")
    assert loaded.eos_token_ids == (2, 3)
    assert loaded.info.architecture == "LlamaForCausalLM"
    assert not loaded.model.training
    assert loaded.tokenizer is not None
    assert loaded.tokenizer.encode("w5 w7 w11") == [5, 7, 11]
    stream = StreamDecoder(loaded.tokenizer)
    pieces = [stream.push(token) for token in (5, 7)] + [stream.flush()]
    assert "".join(pieces) == loaded.tokenizer.decode([5, 7])


@pytest.mark.parametrize(("change", "named"), [
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0"),
    ({"embedding_multiplier": 8.0}, "embedding_multiplier=8.0"),
    ({"layernorm_zero_centered_gamma": True}, "layernorm_zero_centered_gamma=True"),
])
def test_llama_export_refuses_gemma_only_options(change: dict[str, object], named: str,
                                                 tmp_path: Path) -> None:
    """A Llama config.json cannot say these: exporting would silently drop them."""
    import dataclasses

    from protoformer.recipes import get_preset

    model = get_preset("tiny").build_model()
    model.config = dataclasses.replace(model.config, **change)
    with pytest.raises(UnsupportedHFModelError, match=named):
        save_hf(model, tmp_path)
    assert not any(tmp_path.iterdir())
