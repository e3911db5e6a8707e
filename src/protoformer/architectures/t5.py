"""T5 (`T5ForConditionalGeneration`) <-> protoformer's `T5Model` built from the T5 layer recipes.

Covers T5 (ReLU MLP, output layer tied to the embedding and scaled by `d_model ** -0.5`) and
T5 v1.1 / Flan-T5 style checkpoints (gated-GeLU MLP, unscaled output, tied or untied head).
Config: `d_model` -> `hidden_size`, `d_kv` -> `kv_channels`, `d_ff` -> `ffn_hidden_size`,
`num_layers`/`num_decoder_layers` -> the encoder/decoder depths, `feed_forward_proj`
(`ACT` or `gated-ACT`) -> the activation and `gated_linear_unit`; scores are not scaled
(`softmax_scale=1`). Weights: self-attention q/k/v fuse into `linear_qkv`, cross-attention
k/v into `linear_kv`, `wi_0`/`wi_1` into the gated `linear_fc1`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from protoformer.architectures.conversion import (
    ACTIVATIONS,
    ConfigReader,
    JSONDict,
    Seq2SeqModelInfo,
    TensorRule,
    UnsupportedHFModelError,
    activation_name,
    gate_up_rule,
    owned,
    same,
)
from protoformer.architectures.llama import qkv_rule
from protoformer.architectures.registry import register_seq2seq_architecture
from protoformer.config import TransformerConfig
from protoformer.models.t5 import T5Model
from protoformer.recipes.t5_presets import T5Preset, register_t5_preset
from protoformer.spec import not_none
from protoformer.transformer.mlp import gelu_tanh

__all__ = ["T5Architecture", "read_t5_config", "t5_tensor_rules"]


def read_t5_config(values: Mapping[str, object], *, model_type: str, hf_class: str,
                   dtype: torch.dtype, tied: bool,
                   scales_tied_output: bool = True) -> Seq2SeqModelInfo:
    """A T5-layout config.json mapping -> `Seq2SeqModelInfo` (parameters in `dtype`).

    `scales_tied_output=False` (mT5): the decoder output is never scaled unless the config
    says `scale_decoder_outputs` (transformers 5 never scales mT5; 4.x only for a config
    with `tie_word_embeddings=true`, which published mT5 checkpoints do not have).
    """
    reader = ConfigReader(values, f"{hf_class} config")
    projection = reader.get_str("feed_forward_proj", "relu")
    parts = projection.split("-")
    gated = parts[0] == "gated"
    if len(parts) > 2 or (len(parts) == 2 and not gated):
        raise UnsupportedHFModelError(f"feed_forward_proj={projection!r}: expected "
                                      "'ACT' or 'gated-ACT'")
    act = "gelu_new" if projection == "gated-gelu" else parts[-1]
    function = ACTIVATIONS.get(act)
    if function is None:
        raise UnsupportedHFModelError(f"{reader.where}: activation {act!r} is not supported; "
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

    if "scale_decoder_outputs" in values:  # transformers >= 5 records it
        scale = reader.get_bool("scale_decoder_outputs", True)
    elif not scales_tied_output:
        scale = False
    else:  # older configs: T5 v1.1 says tie_word_embeddings=false and is not scaled
        scale = reader.get_bool("tie_word_embeddings", True)
    return Seq2SeqModelInfo(
        model_type=model_type, architecture=hf_class, config=config(decoder_layers),
        encoder_config=config(layers), vocab_size=reader.get_int("vocab_size"),
        relative_attention_num_buckets=reader.get_int("relative_attention_num_buckets", 32),
        relative_attention_max_distance=reader.get_int("relative_attention_max_distance", 128),
        scale_decoder_outputs=scale, tied=tied)


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


def t5_tensor_rules(info: Seq2SeqModelInfo) -> list[TensorRule]:
    """Every tensor of a T5-layout model (the tied copies of `shared.weight` excepted)."""
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


def _check_exportable(model: T5Model, hf_class: str, *, scales_tied_output: bool) -> None:
    config = model.config
    problems: list[str] = []
    if model.scale_decoder_outputs and not scales_tied_output:
        problems.append(f"scale_decoder_outputs=True ({hf_class} never scales the decoder "
                        "output)")
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
        raise UnsupportedHFModelError(f"this T5Model has no Hugging Face {hf_class} "
                                      "equivalent: " + "; ".join(problems))


@dataclass(frozen=True)
class T5Architecture:
    """A T5-layout encoder-decoder (`Seq2SeqArchitecture`): T5 itself, or mT5 (`model_type`
    "mt5", the T5 v1.1 layout with a larger vocabulary).

    `scales_tied_output`: whether a config with `tie_word_embeddings=true` (and no
    `scale_decoder_outputs`) scales the decoder output by `d_model ** -0.5` (T5: yes; mT5: no).
    """

    model_type: str
    hf_class: str
    scales_tied_output: bool = True

    def read_config(self, values: Mapping[str, object], dtype: torch.dtype, *,
                    tied: bool) -> Seq2SeqModelInfo:
        return read_t5_config(values, model_type=self.model_type, hf_class=self.hf_class,
                              dtype=dtype, tied=tied, scales_tied_output=self.scales_tied_output)

    def tensor_rules(self, info: Seq2SeqModelInfo) -> list[TensorRule]:
        return t5_tensor_rules(info)

    def write_config(self, model: T5Model) -> JSONDict:
        _check_exportable(model, self.hf_class, scales_tied_output=self.scales_tied_output)
        config, encoder = model.config, model.encoder_config
        act = activation_name(config)
        projection = ("gated-gelu" if act == "gelu_new" else f"gated-{act}") \
            if config.gated_linear_unit else act
        return {
            "architectures": [self.hf_class], "model_type": self.model_type,
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


register_seq2seq_architecture(T5Architecture("t5", "T5ForConditionalGeneration"))
register_seq2seq_architecture(T5Architecture("mt5", "MT5ForConditionalGeneration",
                                             scales_tied_output=False))


# ------------------------------------------------------------------ presets of published sizes
def _mt5(num_layers: int) -> TransformerConfig:
    # google/mt5-small: d_model 512, 6 heads of 64, gated-GeLU (tanh) MLP of 1024, RMSNorm.
    return TransformerConfig(
        num_layers=num_layers, hidden_size=512, num_attention_heads=6, kv_channels=64,
        ffn_hidden_size=1024, normalization="RMSNorm", layernorm_epsilon=1e-6,
        add_bias_linear=False, gated_linear_unit=True, activation_func=gelu_tanh,
        softmax_scale=1.0, attention_dropout=0.1, hidden_dropout=0.1)


register_t5_preset(T5Preset(
    "mt5-small", "mT5 small (8 + 8 layers, d_model 512, 6 heads of 64, gated-GeLU MLP 1024, "
    "vocab 250112, untied unscaled head)", _mt5, 8, 8, 250112, 1024, False))
