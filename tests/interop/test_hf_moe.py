"""Hugging Face interop of mixture-of-experts models: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and
DeepSeek-V3 with expert layers, as tiny random-init transformers models built offline.

Numbers are compared with the transformers model holding the same weights (float32 logits,
with left padding, and greedy generations); round trips compare every tensor exactly, in
both expert layouts: transformers 5 models hold each layer's experts fused
(`experts.gate_up_proj`), checkpoint files one tensor per expert.
"""

from __future__ import annotations

import importlib.util
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
    parse_hf_config,
    save_hf,
    to_hf,
)
from protoformer.models import GPTModel  # noqa: E402

VOCAB = 80
LOGIT_ATOL = 1e-4
ATTENTION = {"vocab_size": VOCAB, "hidden_size": 32, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-5}
DEEPSEEK = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 40,
            "moe_intermediate_size": 12, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 4, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
            "qk_rope_head_dim": 4, "v_head_dim": 8, "max_position_embeddings": 128,
            "n_routed_experts": 8, "first_k_dense_replace": 1, "n_shared_experts": 2}

# name -> (transformers config class, options); each exercises a part of the mapping.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", {**ATTENTION, "intermediate_size": 24, "num_hidden_layers": 2,
                                  "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2-moe-shared-gate-dense-layer": ("Qwen2MoeConfig", {
        **ATTENTION, "intermediate_size": 40, "moe_intermediate_size": 12,
        "shared_expert_intermediate_size": 20, "num_hidden_layers": 3, "num_experts": 6,
        "num_experts_per_tok": 2, "mlp_only_layers": [1]}),
    "qwen3-moe-norm-topk-sparse-step": ("Qwen3MoeConfig", {
        **ATTENTION, "intermediate_size": 40, "moe_intermediate_size": 12, "head_dim": 12,
        "num_hidden_layers": 3, "num_experts": 8, "num_experts_per_tok": 3,
        "norm_topk_prob": True, "decoder_sparse_step": 2}),
    "olmoe-projection-qk-norm": ("OlmoeConfig", {
        **ATTENTION, "intermediate_size": 16, "num_hidden_layers": 2, "num_experts": 6,
        "num_experts_per_tok": 2, "pad_token_id": 0, "eos_token_id": 1}),
    "deepseek-moe-groups-scaling": ("DeepseekV3Config", {
        **DEEPSEEK, "q_lora_rank": 16, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
        "routed_scaling_factor": 2.5}),
    "deepseek-moe-unnormalised-halves": ("DeepseekV3Config", {
        **DEEPSEEK, "q_lora_rank": None, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
        "norm_topk_prob": False, "routed_scaling_factor": 1.0, "rope_interleave": False}),
}


def hf_config(case: str, **overrides: Any) -> Any:
    import transformers

    class_name, options = CASES[case]
    return getattr(transformers, class_name)(**{**options, **overrides})


def randomize(model: nn.Module, seed: int) -> None:
    """Weights large enough that routing and logits of a tiny model are far from uniform;
    DeepSeek's expert-bias buffers too, so that they change the choice of experts."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.15 * noise)
        for name, buffer in model.named_buffers():
            if name.endswith(("e_score_correction_bias", "router.expert_bias")):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))


def build_hf(case: str, **overrides: Any) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(case, **overrides), dtype=torch.float32)
    randomize(model, seed=sum(map(ord, case)))
    return model.eval()


def token_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    # From 1: transformers' generate() treats token 0 (the pad id given it) as padding.
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(hf_model: Any, ours: GPTModel, *, padded: bool = False) -> None:
    """Equal logits; with `padded`, the second sequence is left-padded by 5 positions and only
    the positions that are not padding are compared."""
    ids = token_ids(2, 16, seed=1)
    keep = torch.ones_like(ids)
    if padded:
        keep[1, :5] = 0
    with torch.no_grad():
        expected = hf_model(ids, attention_mask=keep).logits
        blocked = (keep == 0)[:, None, None, :]  # [b, 1, 1, sk]: True = masked key
        got = ours.eval()(ids, attention_mask=blocked if padded else None)
    assert got.shape == expected.shape
    real = keep.bool()
    assert (got[real] - expected[real]).abs().max().item() <= LOGIT_ATOL


def assert_same_greedy_generation(hf_model: Any, ours: GPTModel) -> None:
    prompt = token_ids(1, 6, seed=2)
    with torch.no_grad():
        out = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                                do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = out[0, prompt.shape[1]:].tolist()
    assert len(expected) == 16
    assert generate(ours, prompt[0], 16, greedy=True) == expected


@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest) -> tuple[str, Any]:
    return request.param, build_hf(request.param)


def test_logits_with_padding_and_greedy_generation_match(case: tuple[str, Any]) -> None:
    _, hf_model = case
    ours = from_hf(hf_model)
    experts = [getattr(hf_model.config, key, None) for key in ("num_experts", "num_local_experts")]
    assert ours.config.num_moe_experts in experts
    assert_same_logits(hf_model, ours)
    assert_same_logits(hf_model, ours, padded=True)
    assert_same_greedy_generation(hf_model, ours)


def test_round_trip_of_a_transformers_model_reproduces_every_tensor(case: tuple[str, Any]) -> None:
    _, hf_model = case
    expected = hf_model.state_dict()
    assert any(name.endswith("experts.gate_up_proj") for name in expected)  # the fused layout
    exported = to_hf(from_hf(hf_model))
    assert sorted(exported) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(exported[name], tensor), name


def test_saved_checkpoint_loads_and_round_trips_per_expert(case: tuple[str, Any],
                                                           tmp_path: Path) -> None:
    from safetensors.torch import load_file

    _, hf_model = case
    hf_model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert any(re.search(r"experts\.0\.", name) for name in stored)  # one tensor per expert
    ours = from_hf(tmp_path)
    assert_same_logits(hf_model, ours)
    exported = to_hf(ours)
    assert sorted(exported) == sorted(stored)
    for name, tensor in stored.items():
        assert torch.equal(exported[name], tensor), name
    fused = to_hf(ours, fused_experts=True)
    assert sorted(fused) == sorted(hf_model.state_dict())


def test_save_hf_loads_with_from_pretrained(case: tuple[str, Any], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    _, hf_model = case
    ours = from_hf(hf_model)
    save_hf(ours, tmp_path, max_shard_size=40_000)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(hf_model)
    assert_same_logits(reloaded, ours)
    reloaded_state = reloaded.state_dict()
    for name, tensor in hf_model.state_dict().items():
        assert torch.equal(reloaded_state[name], tensor), name


def test_mixtral_sliding_window_matches_past_the_window() -> None:
    hf_model = build_hf("mixtral", sliding_window=6)
    ours = from_hf(hf_model)
    assert_same_logits(hf_model, ours)  # 16 positions, window 6
    assert_same_logits(hf_model, ours, padded=True)
    assert_same_greedy_generation(hf_model, ours)  # 6 + 16 tokens


# ------------------------------------------------------------------ models built in protoformer
def _native_model(**overrides: Any) -> GPTModel:
    import torch.nn.functional as F

    from protoformer import MLATransformerConfig, TransformerConfig
    from protoformer.backends import get_backend
    from protoformer.recipes.moe import gpt_moe_layer_specs, mla_moe_layer_specs

    options: dict[str, Any] = {
        "num_layers": 3, "hidden_size": 32, "num_attention_heads": 4, "ffn_hidden_size": 40,
        "normalization": "RMSNorm", "add_bias_linear": False, "gated_linear_unit": True,
        "activation_func": F.silu, "attention_dropout": 0.0, "hidden_dropout": 0.0,
        "num_moe_experts": 4, "moe_ffn_hidden_size": 16, "moe_router_topk": 2, **overrides}
    mla = "kv_lora_rank" in options
    config = (MLATransformerConfig if mla else TransformerConfig)(**options)
    specs = (mla_moe_layer_specs if mla else gpt_moe_layer_specs)(get_backend("local"), config)
    torch.manual_seed(0)
    model = GPTModel(config, specs, VOCAB, 64)
    randomize(model, seed=11)
    return model


@pytest.mark.parametrize(("overrides", "architecture"), [
    ({"num_query_groups": 2}, "MixtralForCausalLM"),
    ({"qk_layernorm": True, "moe_layer_freq": [0, 1, 1]}, "Qwen3MoeForCausalLM"),
    ({"moe_shared_expert_intermediate_size": 24, "moe_shared_expert_gate": True,
      "moe_router_pre_softmax": True, "add_qkv_bias": True}, "Qwen2MoeForCausalLM"),
    ({"kv_lora_rank": 16, "q_lora_rank": 16, "qk_head_dim": 8, "qk_pos_emb_head_dim": 4,
      "v_head_dim": 8, "moe_layer_freq": [0, 1, 1], "moe_router_score_function": "sigmoid",
      "moe_router_enable_expert_bias": True, "moe_shared_expert_intermediate_size": 32,
      "moe_router_topk_scaling_factor": 2.0, "num_moe_experts": 8, "moe_router_topk": 4,
      "moe_router_num_groups": 4, "moe_router_group_topk": 2}, "DeepseekV3ForCausalLM"),
])
def test_native_moe_model_exports_to_the_architecture_that_represents_it(
        overrides: dict[str, Any], architecture: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    ours = _native_model(**overrides)
    save_hf(ours, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded).__name__ == architecture
    assert_same_logits(reloaded, ours)
    assert_same_logits(reloaded, from_hf(tmp_path))


def test_native_moe_model_no_architecture_represents_is_refused_with_the_reasons() -> None:
    ours = _native_model(moe_router_pre_softmax=True, moe_expert_capacity_factor=1.5)
    with pytest.raises(UnsupportedHFModelError) as raised:
        to_hf(ours)
    message = str(raised.value)
    assert "no Hugging Face architecture represents this model" in message
    assert "MixtralForCausalLM" in message and "moe_expert_capacity_factor" in message
    assert "num_moe_experts=4 (these models are dense" in message  # Llama's refusal


def test_a_dense_config_does_not_describe_an_moe_model() -> None:
    from transformers import LlamaConfig

    ours = _native_model(num_query_groups=2)
    dense = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="num_moe_experts: model 4, config None"):
        to_hf(ours, config=dense)


def test_olmoe_is_exported_only_from_a_model_with_its_projection_norms() -> None:
    """The whole-projection q/k norms are in OLMoE's layer spec, not in the config: a model
    built from the plain GPT recipe is not exported as OLMoE, even with OLMoE's config."""
    olmoe = build_hf("olmoe-projection-qk-norm")
    assert "ProjectionRMSNorm" in str(from_hf(olmoe).decoder.layers[0].self_attention)
    plain = _native_model(num_layers=2, num_query_groups=2, ffn_hidden_size=16,
                          moe_ffn_hidden_size=16, num_moe_experts=6, moe_router_pre_softmax=True)
    with pytest.raises(UnsupportedHFModelError, match=r"no .*q_layernorm\.weight"):
        to_hf(plain, config=olmoe.config)
    with pytest.raises(UnsupportedHFModelError, match="no Hugging Face architecture"):
        to_hf(plain)  # not picked by default either


# ------------------------------------------------------------------ refused configs
@pytest.mark.parametrize(("case", "overrides", "message"), [
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise=0.1"),
    ("qwen2-moe-shared-gate-dense-layer", {"use_sliding_window": True, "sliding_window": 16},
     "sliding_window=16"),
    ("qwen3-moe-norm-topk-sparse-step", {"attention_bias": True}, "attention_bias=true"),
    ("qwen3-moe-norm-topk-sparse-step", {"num_experts_per_tok": 1, "norm_topk_prob": True},
     "num_experts_per_tok=1 with normalised"),
    ("olmoe-projection-qk-norm", {"clip_qkv": 8.0}, "clip_qkv=8.0"),
    ("olmoe-projection-qk-norm", {"head_dim": 16}, "head_dim=16"),
    ("deepseek-moe-groups-scaling", {"num_experts_per_tok": 2}, "best 2 experts"),
    ("deepseek-moe-groups-scaling", {"moe_layer_freq": 2}, "moe_layer_freq=2"),
    ("deepseek-moe-groups-scaling", {"scoring_func": "softmax"}, "scoring_func='softmax'"),
])
def test_unsupported_moe_configs_are_refused_naming_the_feature(
        case: str, overrides: dict[str, Any], message: str) -> None:
    values = {**hf_config(case).to_dict(), **overrides}
    with pytest.raises(UnsupportedHFModelError, match=re.escape(message)):
        parse_hf_config(values)


def test_expert_tensors_that_do_not_match_the_config_are_listed(tmp_path: Path) -> None:
    import json

    build_hf("mixtral").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_local_experts"] = 5
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFConversionError, match=r"missing \(6\)") as raised:
        from_hf(tmp_path)
    assert "model.layers.0.block_sparse_moe.experts.4.w1.weight" in str(raised.value)


@pytest.mark.parametrize(("preset", "architecture"), [
    ("mixtral-8x7b", "MixtralForCausalLM"),
    ("qwen3-30b-a3b", "Qwen3MoeForCausalLM"),
    ("deepseek-v3", "DeepseekV3ForCausalLM"),
])
def test_published_moe_shapes_export_a_config_transformers_builds_the_same(
        preset: str, architecture: str) -> None:
    """The exported config.json of each MoE preset (meta device: no weights) makes a
    transformers model with our parameter count, and reads back as the same config."""
    import transformers

    from protoformer.interop import hf_config_dict
    from protoformer.recipes import get_preset

    ours = get_preset(preset).build_model(device="meta")
    values = hf_config_dict(ours)
    assert values["architectures"] == [architecture]
    config = transformers.AutoConfig.for_model(**values)
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in reference.parameters()) == \
        sum(p.numel() for p in ours.parameters())
    read_back = parse_hf_config(values).config
    assert read_back.moe_layer_pattern == ours.config.moe_layer_pattern
    assert read_back.moe_normalizes_topk_probs == ours.config.moe_normalizes_topk_probs


def test_generate_hf_runs_a_moe_checkpoint(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`protoformer generate --hf` on a saved Qwen2-MoE directory with a byte-level BPE
    tokenizer prints the transformers model's greedy continuation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from protoformer.cli import main

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(["def mixture(experts):\n    return sum(experts)\n"] * 10,
                                  trainer=trainers.BpeTrainer(
                                      vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False))
    hf_model = build_hf("qwen2-moe-shared-gate-dense-layer",
                        vocab_size=tokenizer.get_vocab_size())
    hf_model.save_pretrained(tmp_path)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    prompt = "def mix"
    ids = tokenizer.encode(prompt).ids
    with torch.no_grad():  # greedy by the transformers model, the whole sequence each step
        for _ in range(6):
            ids.append(int(hf_model(torch.tensor([ids])).logits[0, -1].argmax()))
    continuation = tokenizer.decode(ids[len(tokenizer.encode(prompt).ids):])
    argv = ["generate", "--hf", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "6",
            "--greedy", "--device", "cpu"]
    assert main(argv) == 0
    assert capsys.readouterr().out == prompt + continuation + "\n"
