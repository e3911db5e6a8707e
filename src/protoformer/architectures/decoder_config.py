"""The config.json fields Llama-style decoders share (Llama, Mistral, Qwen, Phi-3, Gemma,
OLMo, the Llama-style mixture-of-experts families), read and written in one place: the head
size, plain rotary embeddings, the base `TransformerConfig` a family starts from, and the
config.json values every such family writes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from protoformer.architectures.conversion import (
    ConfigReader,
    HFConversionError,
    JSONDict,
    UnsupportedHFModelError,
    activation_for,
    checked_config,
    read_rope,
)
from protoformer.architectures.registry import ModelSizes
from protoformer.config import TransformerConfig

__all__ = ["decoder_config_values", "read_decoder_config", "read_head_dim",
           "require_default_rope"]


# ------------------------------------------------------------------ config: HF -> protoformer
def require_default_rope(reader: ConfigReader, family: str, *,
                         partial_rotary: bool = False) -> tuple[float, ConfigReader]:
    """`read_rope` for a family that maps plain rotary embeddings only: (`rope_theta`, a
    reader over the rope parameters); any `rope_type` but 'default' is refused naming `family`."""
    rope_type, theta, rope = read_rope(reader, partial_rotary=partial_rotary)
    if rope_type != "default":
        raise UnsupportedHFModelError(f"{reader.where}: rope_type={rope_type!r} is not "
                                      f"supported; protoformer maps 'default' for {family}")
    return theta, rope


def read_head_dim(reader: ConfigReader) -> int:
    """Each attention head's width: `head_dim` when the config gives it, else
    `hidden_size / num_attention_heads` (an error when that does not divide)."""
    head_dim = reader.get_optional_int("head_dim")
    if head_dim is not None:
        return head_dim
    hidden, heads = reader.get_int("hidden_size"), reader.get_int("num_attention_heads")
    if hidden % heads != 0:
        raise HFConversionError(f"{reader.where}: hidden_size={hidden} is not divisible by "
                                f"num_attention_heads={heads} and head_dim is not given")
    return hidden // heads


def read_decoder_config(reader: ConfigReader, dtype: torch.dtype, *, head_dim: int,
                        rotary_base: float, ffn_hidden_size: int | None = None,
                        activation_func: Callable[[Tensor], Tensor] | None = None,
                        layernorm_epsilon: float = 1e-6) -> TransformerConfig:
    """The `TransformerConfig` fields every Llama-style config.json states the same way: layer
    count and sizes (`ffn_hidden_size` defaults to `intermediate_size`), grouped query heads,
    RMSNorm (`layernorm_epsilon` is `rms_norm_eps`'s default), a gated MLP without biases
    (`activation_func` defaults to `hidden_act`'s), initialisation std, `dtype`, dropouts and
    the rotary base. A family replaces what differs (`dataclasses.replace` inside
    `checked_config`)."""
    activation = activation_func if activation_func is not None else activation_for(reader)
    heads = reader.get_int("num_attention_heads")
    return checked_config(reader, lambda: TransformerConfig(
        num_layers=reader.get_int("num_hidden_layers"),
        hidden_size=reader.get_int("hidden_size"),
        num_attention_heads=heads,
        num_query_groups=reader.get_optional_int("num_key_value_heads") or heads,
        kv_channels=head_dim,
        ffn_hidden_size=(ffn_hidden_size if ffn_hidden_size is not None
                         else reader.get_int("intermediate_size")),
        normalization="RMSNorm",
        layernorm_epsilon=reader.get_float("rms_norm_eps", layernorm_epsilon),
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=activation,
        init_method_std=reader.get_float("initializer_range", 0.02),
        perform_initialization=False,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        attention_dropout=reader.get_float("attention_dropout", 0.0),
        hidden_dropout=0.0,
        rotary_base=rotary_base,
    ))


# ------------------------------------------------------------------ config: protoformer -> HF
def decoder_config_values(config: TransformerConfig, sizes: ModelSizes, *, model_type: str,
                          hf_class: str) -> JSONDict:
    """The config.json values every Llama-style family writes the same way (sizes, grouped
    query heads, norm epsilon, init std, dropout, embedding tying); a family adds its own
    (activation, MLP width, rotary settings, biases)."""
    return {
        "architectures": [hf_class],
        "model_type": model_type,
        "vocab_size": sizes.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.query_groups,
        "head_dim": config.head_dim,
        "max_position_embeddings": sizes.max_sequence_length,
        "rms_norm_eps": config.layernorm_epsilon,
        "initializer_range": config.init_method_std,
        "attention_dropout": config.attention_dropout,
        "tie_word_embeddings": sizes.tie_word_embeddings,
        "use_cache": True,
    }
