"""Hugging Face T5 (`T5ForConditionalGeneration`) checkpoints in and out of `T5Model`.

    model = t5_from_hf("path/to/t5-small")        # a directory: config.json + safetensors
    model = t5_from_hf(hf_t5_model)               # a transformers model instance
    save_t5_hf(model, "out/")                     # loadable by T5ForConditionalGeneration

Covers T5 (ReLU MLP, output layer tied to the embedding and scaled by `d_model ** -0.5`) and
T5 v1.1 / Flan-T5 style checkpoints (gated-GeLU MLP, unscaled output, tied or untied head).
As for the decoder-only architectures, every tensor of the checkpoint must be used and every
parameter filled; the tied copies (`encoder.embed_tokens`, `decoder.embed_tokens` and a tied
`lm_head`) must equal `shared.weight`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from protoformer.backends import get_backend
from protoformer.config import TransformerConfig
from protoformer.interop.hf import open_hf_source
from protoformer.interop.hf_common import (
    ACTIVATIONS,
    ConfigReader,
    HFConversionError,
    JSONDict,
    TensorRule,
    UnsupportedHFModelError,
    activation_name,
    gate_up_rule,
    owned,
    same,
)
from protoformer.interop.hf_files import (
    TensorSource,
    load_rules,
    name_listing,
    natural_order,
    write_safetensors,
)
from protoformer.interop.hf_llama import qkv_rule
from protoformer.models.t5 import T5Model
from protoformer.recipes.t5 import t5_decoder_layer_spec, t5_encoder_layer_spec
from protoformer.spec import not_none

__all__ = ["save_t5_hf", "t5_from_hf", "t5_hf_config", "t5_to_hf"]

_TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


class _T5Info:
    """A T5 config in protoformer's terms."""

    def __init__(self, values: JSONDict, *, dtype: torch.dtype, tied: bool) -> None:
        reader = ConfigReader(values, "T5 config")
        model_type = reader.get_str("model_type", "t5")
        if model_type != "t5":
            raise UnsupportedHFModelError(f"model_type={model_type!r}: t5_from_hf converts T5 "
                                          "checkpoints (model_type 't5')")
        projection = reader.get_str("feed_forward_proj", "relu")
        parts = projection.split("-")
        gated = parts[0] == "gated"
        if len(parts) > 2 or (len(parts) == 2 and not gated):
            raise UnsupportedHFModelError(f"feed_forward_proj={projection!r}: expected "
                                          "'ACT' or 'gated-ACT'")
        act = "gelu_new" if projection == "gated-gelu" else parts[-1]
        function = ACTIVATIONS.get(act)
        if function is None:
            raise UnsupportedHFModelError(f"T5 config: activation {act!r} is not supported; "
                                          f"protoformer maps {', '.join(sorted(ACTIVATIONS))}")
        heads, dropout = reader.get_int("num_heads"), reader.get_float("dropout_rate", 0.1)
        layers = reader.get_int("num_layers")
        decoder_layers = reader.get_optional_int("num_decoder_layers") or layers

        def config(num_layers: int) -> TransformerConfig:
            return TransformerConfig(
                num_layers=num_layers, hidden_size=reader.get_int("d_model"),
                num_attention_heads=heads, num_query_groups=heads,
                kv_channels=reader.get_int("d_kv"), ffn_hidden_size=reader.get_int("d_ff"),
                normalization="RMSNorm", layernorm_epsilon=reader.get_float("layer_norm_epsilon", 1e-6),
                add_bias_linear=False, add_qkv_bias=False, gated_linear_unit=gated,
                activation_func=function, softmax_scale=1.0,  # T5 does not scale the scores
                attention_dropout=dropout, hidden_dropout=dropout, params_dtype=dtype,
                perform_initialization=False)

        self.config = config(decoder_layers)
        self.encoder_config = config(layers)
        self.vocab_size = reader.get_int("vocab_size")
        self.num_buckets = reader.get_int("relative_attention_num_buckets", 32)
        self.max_distance = reader.get_int("relative_attention_max_distance", 128)
        if "scale_decoder_outputs" in values:  # transformers >= 5 records it
            self.scale = reader.get_bool("scale_decoder_outputs", True)
        else:  # older configs: T5 v1.1 says tie_word_embeddings=false and is not scaled
            self.scale = reader.get_bool("tie_word_embeddings", True)
        self.tied = tied


def _kv_rule(ours: str, theirs: str, config: TransformerConfig) -> TensorRule:
    heads, hn = config.num_attention_heads, config.head_dim

    def to_ours(parts: Sequence[Tensor]) -> Tensor:
        k, v = (p.reshape(heads, hn, -1) for p in parts)  # [ng, hn, h]
        return torch.cat((k, v), dim=1).reshape(heads * 2 * hn, -1)  # per group [k | v]

    def to_theirs(fused: Tensor) -> tuple[Tensor, ...]:
        k, v = torch.split(fused.reshape(heads, 2 * hn, -1), [hn, hn], dim=1)  # [ng, hn, h] each
        return owned(k.reshape(heads * hn, -1)), owned(v.reshape(heads * hn, -1))

    return TensorRule(f"{ours}.linear_kv.weight", (f"{theirs}.k.weight", f"{theirs}.v.weight"),
                      to_ours, to_theirs)


def _mlp_rules(config: TransformerConfig, ours: str, theirs: str) -> list[TensorRule]:
    if config.gated_linear_unit:  # act(wi_0) * wi_1: wi_0 is the gate
        fc1 = gate_up_rule(f"{ours}.linear_fc1.weight", f"{theirs}.wi_0.weight",
                           f"{theirs}.wi_1.weight")
    else:
        fc1 = same(f"{ours}.linear_fc1.weight", f"{theirs}.wi.weight")
    return [fc1, same(f"{ours}.linear_fc2.weight", f"{theirs}.wo.weight")]


def _rules(info: _T5Info) -> list[TensorRule]:
    rules = [same("embedding.weight", "shared.weight"),
             same("encoder_relative_pos_emb.weight",
                  "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
             same("decoder_relative_pos_emb.weight",
                  "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")]
    for stack, config in (("encoder", info.encoder_config), ("decoder", info.config)):
        for index in range(config.num_layers):
            ours, theirs = f"{stack}.layers.{index}", f"{stack}.block.{index}.layer"
            rules += [same(f"{ours}.input_layernorm.weight", f"{theirs}.0.layer_norm.weight"),
                      qkv_rule(f"{ours}.self_attention", f"{theirs}.0.SelfAttention", "weight",
                               config, projections=("q", "k", "v")),
                      same(f"{ours}.self_attention.linear_proj.weight",
                           f"{theirs}.0.SelfAttention.o.weight")]
            mlp = 1
            if stack == "decoder":
                mlp = 2
                rules += [same(f"{ours}.pre_cross_attn_layernorm.weight",
                               f"{theirs}.1.layer_norm.weight"),
                          same(f"{ours}.cross_attention.linear_q.weight",
                               f"{theirs}.1.EncDecAttention.q.weight"),
                          _kv_rule(f"{ours}.cross_attention", f"{theirs}.1.EncDecAttention", config),
                          same(f"{ours}.cross_attention.linear_proj.weight",
                               f"{theirs}.1.EncDecAttention.o.weight")]
            rules.append(same(f"{ours}.pre_mlp_layernorm.weight", f"{theirs}.{mlp}.layer_norm.weight"))
            rules += _mlp_rules(config, f"{ours}.mlp", f"{theirs}.{mlp}.DenseReluDense")
        rules.append(same(f"{stack}.final_layernorm.weight", f"{stack}.final_layer_norm.weight"))
    if not info.tied:
        rules.append(same("output_layer.weight", "lm_head.weight"))
    return rules


def _check_names(rules: list[TensorRule], source: TensorSource, tied: bool) -> None:
    expected = {name for rule in rules for name in rule.theirs}
    present = set(source.names())
    copies = set(_TIED_COPIES) | ({"lm_head.weight"} if tied else set[str]())
    for name in sorted(copies & present):
        if "shared.weight" in present and not torch.equal(source.get(name), source.get("shared.weight")):
            raise HFConversionError(f"{source.where}: {name} differs from shared.weight; T5Model "
                                    "shares one embedding between encoder and decoder")
    missing = sorted(expected - present, key=natural_order)
    unexpected = sorted(present - expected - copies, key=natural_order)
    if missing or unexpected:
        raise HFConversionError(
            f"{source.where}: the tensors do not match the T5 layout its config describes"
            + (name_listing("missing", missing) if missing else "")
            + (name_listing("unexpected", unexpected) if unexpected else ""))


def t5_from_hf(source: str | os.PathLike[str] | torch.nn.Module, *,
               dtype: torch.dtype | None = None, device: torch.device | str | None = None,
               max_sequence_length: int = 512) -> T5Model:
    """A protoformer `T5Model` with the weights of a Hugging Face T5 checkpoint or model.

    `source`: a checkpoint directory (config.json + safetensors, read without transformers)
    or a `T5ForConditionalGeneration`. The output layer is tied to the embedding unless the
    checkpoint's `lm_head.weight` differs from `shared.weight`. `max_sequence_length` bounds
    the inputs (T5's relative positions themselves have no limit; it was trained on 512).
    The model is single-process and in training mode: call `.eval()` for inference.
    """
    values, tensors = open_hf_source(source)
    names = set(tensors.names())
    if "shared.weight" not in names:
        raise HFConversionError(f"{tensors.where}: no shared.weight; not a T5 checkpoint")
    tied = "lm_head.weight" not in names or torch.equal(tensors.get("lm_head.weight"),
                                                        tensors.get("shared.weight"))
    info = _T5Info(values, dtype=dtype if dtype is not None else tensors.dtype("shared.weight"),
                   tied=tied)
    rules = _rules(info)
    _check_names(rules, tensors, tied)
    placement = torch.device(device) if device is not None else contextlib.nullcontext()
    backend = get_backend("local")
    with placement:
        model = T5Model(info.config, t5_encoder_layer_spec(backend, info.encoder_config),
                        t5_decoder_layer_spec(backend, info.config), info.vocab_size,
                        max_sequence_length, encoder_config=info.encoder_config,
                        relative_attention_num_buckets=info.num_buckets,
                        relative_attention_max_distance=info.max_distance,
                        share_embeddings_and_output_weights=tied,
                        scale_decoder_outputs=info.scale)
    load_rules(model, rules, tensors)
    for config in (info.config, info.encoder_config):
        config.perform_initialization = True  # a model rebuilt from it initialises as usual
    return model


def _check_exportable(model: T5Model) -> None:
    config = model.config
    problems: list[str] = []
    if model.position_embedding_type != "relative":
        problems.append(f"position_embedding_type={model.position_embedding_type!r} (T5 uses "
                        "'relative')")
    if model.scale_decoder_outputs and not model.share_embeddings_and_output_weights:
        problems.append("scale_decoder_outputs=True with an untied output layer (Hugging Face's "
                        "T5 scales the decoder output only for a head tied to the embedding)")
    for name, stack in (("config", config), ("encoder_config", model.encoder_config)):
        if stack.normalization != "RMSNorm" or stack.add_bias_linear or stack.add_qkv_bias:
            problems.append(f"{name}: T5 has RMSNorm and no linear biases")
        if stack.query_groups != stack.num_attention_heads or stack.qk_layernorm:
            problems.append(f"{name}: T5 has plain multi-head attention (no GQA, no qk norm)")
        if stack.softmax_scale != 1.0:
            problems.append(f"{name}.softmax_scale={stack.softmax_scale} (T5 uses 1.0)")
    if problems:
        raise UnsupportedHFModelError("this T5Model has no Hugging Face T5 equivalent: "
                                      + "; ".join(problems))


def t5_hf_config(model: T5Model) -> JSONDict:
    """The Hugging Face `config.json` values describing `model` (a T5ForConditionalGeneration)."""
    _check_exportable(model)
    config, encoder = model.config, model.encoder_config
    act = activation_name(config)
    projection = ("gated-gelu" if act == "gelu_new" else f"gated-{act}") \
        if config.gated_linear_unit else act
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
        "vocab_size": model.vocab_size, "d_model": config.hidden_size, "d_kv": config.head_dim,
        "d_ff": config.ffn_hidden_size, "num_layers": encoder.num_layers,
        "num_decoder_layers": config.num_layers, "num_heads": config.num_attention_heads,
        "relative_attention_num_buckets": not_none(model.decoder_relative_pos_emb).num_buckets,
        "relative_attention_max_distance": not_none(model.decoder_relative_pos_emb).max_distance,
        "dropout_rate": config.hidden_dropout, "layer_norm_epsilon": config.layernorm_epsilon,
        "feed_forward_proj": projection, "is_encoder_decoder": True,
        # What transformers reads from it: 4.x ties the head and scales when true; 5.x always
        # ties and scales when true. Unscaled models store lm_head.weight, right for both.
        "tie_word_embeddings": model.scale_decoder_outputs,
        "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
        "torch_dtype": str(model.embedding.weight.dtype).removeprefix("torch."),
    }


def t5_to_hf(model: T5Model) -> dict[str, Tensor]:
    """`model`'s weights under Hugging Face T5 names (tied copies included, as `state_dict()` has)."""
    config = t5_hf_config(model)
    info = _T5Info(config, dtype=model.embedding.weight.dtype,
                   tied=model.share_embeddings_and_output_weights)
    state = model.state_dict()
    tensors: dict[str, Tensor] = {}
    for rule in _rules(info):
        tensors.update(zip(rule.theirs, rule.to_theirs(state[rule.ours].detach()), strict=True))
    for name in _TIED_COPIES + (("lm_head.weight",) if info.tied else ()):
        tensors[name] = tensors["shared.weight"]
    return tensors


def _stored_copies(model: T5Model) -> tuple[str, ...]:
    """The tied names `save_t5_hf` leaves out: transformers re-ties them on load."""
    return _TIED_COPIES + (("lm_head.weight",) if model.scale_decoder_outputs else ())


def save_t5_hf(model: T5Model, directory: str | os.PathLike[str], *,
               max_shard_size: int | None = None) -> Path:
    """Write `model` as a Hugging Face T5 checkpoint (config.json + safetensors); returns the path.

    `T5ForConditionalGeneration.from_pretrained(directory)` loads it. The tied copies of the
    embedding are not stored (transformers re-ties them), except the head of an unscaled
    model (`tie_word_embeddings: false`), which transformers 4 loads as its own tensor.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    values = t5_hf_config(model)
    tensors = t5_to_hf(model)
    for name in _stored_copies(model):
        del tensors[name]
    if "lm_head.weight" in tensors and tensors["lm_head.weight"] is tensors["shared.weight"]:
        tensors["lm_head.weight"] = owned(tensors["lm_head.weight"])  # files hold no aliases
    write_safetensors(path, tensors, max_shard_size=max_shard_size)
    (path / "config.json").write_text(json.dumps(values, indent=2, sort_keys=True) + "\n",
                                      encoding="utf-8")
    return path
