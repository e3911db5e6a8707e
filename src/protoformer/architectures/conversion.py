"""What every Hugging Face architecture shares: errors, the model description, config reading,
activations and the tensor rules of embeddings, norms and the gated MLP.

A `TensorRule` ties one protoformer parameter to the Hugging Face tensor(s) it is made from,
with both directions of the conversion. Loading and exporting walk the same list of rules, so
`to_hf(from_hf(m))` gives back exactly `m`'s tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from protoformer.config import TransformerConfig, size_problem
from protoformer.jsonio import clip
from protoformer.transformer.mlp import gelu_tanh

__all__ = [
    "ACTIVATIONS",
    "DESCRIBED_FIELDS",
    "ConfigReader",
    "HFConversionError",
    "HFModelInfo",
    "JSONDict",
    "MLPLayerRules",
    "Seq2SeqModelInfo",
    "TensorRule",
    "UnsupportedHFModelError",
    "activation_for",
    "activation_name",
    "checked_config",
    "dense_mlp_layer_rules",
    "format_layer_list",
    "gate_up_rule",
    "hf_model_info",
    "json_object",
    "mlp_rules",
    "model_rules",
    "owned",
    "read_partial_rotary_factor",
    "read_rope",
    "same",
]

JSONDict = dict[str, object]

# The `TransformerConfig` fields every Hugging Face config determines; `hf_model_info` checks
# that a model's config agrees with them (a family adds its own in `HFModelInfo.described_fields`).
DESCRIBED_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                    "normalization", "layernorm_epsilon", "qk_layernorm", "add_bias_linear",
                    "add_qkv_bias", "gated_linear_unit", "rotary_base", "rotary_percent",
                    "rotary_interleaved", "softmax_scale", "activation_func",
                    "num_moe_experts", "moe_layer_pattern")

# Hugging Face `hidden_act` names and the functions that compute them exactly.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
}


class HFConversionError(ValueError):
    """A Hugging Face checkpoint or config that does not describe a loadable model."""


class UnsupportedHFModelError(NotImplementedError, ValueError):
    """A Hugging Face architecture or feature that protoformer cannot represent exactly.

    A `NotImplementedError` (the feature may come later) and a `ValueError` (to the user it is
    a value in their config), so command-line error handling that catches `ValueError` reports
    it in one line.
    """


def json_object(value: object) -> JSONDict:
    """A mapping (from `json.loads` or a config's `to_dict()`) with its keys as strings."""
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a mapping, got {type(value).__qualname__}")
    items = cast("Mapping[object, object]", value)
    return {str(key): item for key, item in items.items()}


@dataclass(frozen=True)
class HFModelInfo:
    """A Hugging Face causal LM described in protoformer's terms: its config and the model sizes.

    `architecture` is the transformers class (`LlamaForCausalLM`). `hf_config` is the Hugging
    Face config the description was read from (written back by `save_hf`). `described_fields`
    are the config fields the Hugging Face config determines (`hf_model_info` compares them
    with a model's). `rope_interleave` (DeepSeek-V3 only) says whether the checkpoint stores the
    rotary rows of queries and keys as interleaved pairs (protoformer's MLA layout) or as
    halves. `extra_layers` counts DeepSeek's multi-token-prediction layers stored after the
    decoder, which protoformer does not use. `fused_experts` says how the source stores routed
    experts: transformers 5 models hold each layer's experts fused (`experts.gate_up_proj`,
    `experts.down_proj`), checkpoint files one tensor per expert (see `moe_conversion`).
    """

    model_type: str
    architecture: str
    config: TransformerConfig
    vocab_size: int
    max_sequence_length: int
    tie_word_embeddings: bool
    hf_config: JSONDict = field(repr=False)
    described_fields: tuple[str, ...] = DESCRIBED_FIELDS
    rope_interleave: bool = True
    extra_layers: int = 0
    fused_experts: bool = False


@dataclass(frozen=True)
class Seq2SeqModelInfo:
    """A Hugging Face encoder-decoder model (T5 and relatives) in protoformer's terms.

    `config` describes the decoder stack, `encoder_config` the encoder's; `scale_decoder_outputs`
    says whether the decoder output is scaled by `d_model ** -0.5` before the tied head;
    `tied`, whether the output layer shares the embedding.
    """

    model_type: str
    architecture: str
    config: TransformerConfig
    encoder_config: TransformerConfig
    vocab_size: int
    relative_attention_num_buckets: int
    relative_attention_max_distance: int
    scale_decoder_outputs: bool
    tied: bool


HF_SIZE_KEYS: dict[str, str] = {
    "hidden_size": "hidden_size", "d_model": "hidden_size",
    "num_hidden_layers": "num_layers", "num_layers": "num_layers",
    "num_decoder_layers": "num_layers",
    "num_attention_heads": "num_attention_heads", "num_heads": "num_attention_heads",
    "num_key_value_heads": "num_query_groups",
    "head_dim": "kv_channels", "d_kv": "kv_channels",
    "intermediate_size": "ffn_hidden_size", "d_ff": "ffn_hidden_size",
    "moe_intermediate_size": "ffn_hidden_size",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "max_sequence_length",
    "original_max_position_embeddings": "max_sequence_length",
    "q_lora_rank": "q_lora_rank", "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_head_dim", "qk_rope_head_dim": "qk_pos_emb_head_dim",
    "v_head_dim": "v_head_dim",
}
"""config.json keys that are sizes -> the protoformer size whose bound (`MAX_SIZES`) they
share. `ConfigReader.get_int` checks them when they are read, so every architecture's reader
refuses `hidden_size: 1000000000` or `num_attention_heads: 0` in one line naming the key,
before any arithmetic or allocation uses the value."""


class ConfigReader:
    """Typed access to a config.json mapping, with errors that name the key and the value.

    Sizes (`HF_SIZE_KEYS`) are bounds-checked as they are read.
    """

    def __init__(self, values: Mapping[str, object], where: str) -> None:
        self.values = values
        self.where = where

    def _fail(self, key: str, value: object, expected: str) -> HFConversionError:
        return HFConversionError(f"{self.where}: {key}={clip(repr(value))} must be {expected}")

    def present(self, key: str) -> bool:
        """Whether `key` is set to something other than null."""
        return self.values.get(key) is not None

    def get_int(self, key: str, default: int | None = None) -> int:
        value = self.values.get(key)
        if value is None:
            if default is None:
                raise HFConversionError(f"{self.where}: the config has no {key!r}; a "
                                        f"{self.where} config needs it")
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, value, "an integer")
        size = HF_SIZE_KEYS.get(key)
        problem = size_problem(size, value) if size is not None else None
        if problem is not None:
            raise HFConversionError(f"{self.where}: {key}={value} {problem} (the config.json "
                                    "is corrupt or not a real model's)")
        return value

    def get_optional_int(self, key: str) -> int | None:
        return self.get_int(key) if self.present(key) else None

    def get_float(self, key: str, default: float | None = None) -> float:
        value = self.values.get(key)
        if value is None:
            if default is None:
                raise HFConversionError(f"{self.where}: the config has no {key!r}")
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._fail(key, value, "a number")
        return float(value)

    def get_bool(self, key: str, default: bool) -> bool:
        value = self.values.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._fail(key, value, "true or false")
        return value

    def get_str(self, key: str, default: str) -> str:
        value = self.values.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self._fail(key, value, "a string")
        return value

    def get_str_list(self, key: str) -> list[str] | None:
        """A list of strings (e.g. `layer_types`), or None when the key is absent or null."""
        value = self.values.get(key)
        if value is None:
            return None
        if not isinstance(value, list):
            raise self._fail(key, value, "a list of strings")
        items = cast("list[object]", value)  # JSON list
        strings = [item for item in items if isinstance(item, str)]
        if len(strings) != len(items):
            raise self._fail(key, items, "a list of strings")
        return strings

    def get_layer_types(self, num_layers: int) -> list[str] | None:
        """`layer_types` (one of `sliding_attention` / `full_attention` per layer), or None."""
        kinds = self.get_str_list("layer_types")
        if kinds is None:
            return None
        allowed = ("sliding_attention", "full_attention")
        if len(kinds) != num_layers or any(kind not in allowed for kind in kinds):
            raise self._fail("layer_types", kinds, f"one of {allowed} for each of the "
                                                   f"{num_layers} layers")
        return kinds

    def get_mapping(self, key: str) -> JSONDict | None:
        value = self.values.get(key)
        if value is None:
            return None
        try:
            return json_object(value)
        except TypeError:
            raise self._fail(key, value, "an object") from None


ConfigT = TypeVar("ConfigT", bound=TransformerConfig)


def checked_config(reader: ConfigReader, make: Callable[[], ConfigT]) -> ConfigT:
    """`make()` (a config built from `reader`'s values), with `TransformerConfig`'s validation
    errors reported as `HFConversionError`s naming the config (errors of the reader itself
    already name the key and pass through)."""
    try:
        return make()
    except (HFConversionError, UnsupportedHFModelError):
        raise
    except ValueError as error:  # TransformerConfig's validation
        raise HFConversionError(f"{reader.where}: {error}") from error


def hf_model_info(reader: ConfigReader, config: TransformerConfig, *, model_type: str,
                  architecture: str, described_fields: tuple[str, ...] = DESCRIBED_FIELDS,
                  max_sequence_length: int | None = None, tied_by_default: bool = False,
                  rope_interleave: bool = True, extra_layers: int = 0,
                  fused_experts: bool = False) -> HFModelInfo:
    """The `HFModelInfo` a causal family's `read_config` returns: `config` with the model
    sizes every config.json states (`vocab_size`, `max_position_embeddings` unless
    `max_sequence_length` is given, `tie_word_embeddings` defaulting to `tied_by_default`)."""
    return HFModelInfo(
        model_type=model_type,
        architecture=architecture,
        config=config,
        vocab_size=reader.get_int("vocab_size"),
        max_sequence_length=(max_sequence_length if max_sequence_length is not None
                             else reader.get_int("max_position_embeddings")),
        tie_word_embeddings=reader.get_bool("tie_word_embeddings", tied_by_default),
        hf_config=dict(reader.values),
        described_fields=described_fields,
        rope_interleave=rope_interleave,
        extra_layers=extra_layers,
        fused_experts=fused_experts,
    )


def activation_for(reader: ConfigReader) -> Callable[[Tensor], Tensor]:
    """The function for the config's `hidden_act` (default `silu`)."""
    name = reader.get_str("hidden_act", "silu")
    function = ACTIVATIONS.get(name)
    if function is None:
        raise UnsupportedHFModelError(
            f"{reader.where}: hidden_act={name!r} is not supported; protoformer maps "
            f"{', '.join(sorted(ACTIVATIONS))}")
    return function


def read_rope(reader: ConfigReader, *,
              partial_rotary: bool = False) -> tuple[str, float, ConfigReader]:
    """The rotary settings: (`rope_type`, `rope_theta`, a reader over the rope parameters).

    Transformers 5 keeps them in `rope_parameters` (with `rope_theta` inside); older
    config.json files have a top-level `rope_theta` and a `rope_scaling` object whose type
    may be under `type`. As in transformers 5, `rope_scaling` wins when both are present.
    A `partial_rotary_factor` other than 1 is refused unless `partial_rotary` (the family
    reads it with `read_partial_rotary_factor`).
    """
    params = reader.get_mapping("rope_scaling") or reader.get_mapping("rope_parameters") or {}
    nested = [key for key, value in params.items() if isinstance(value, Mapping)]
    if nested:
        raise UnsupportedHFModelError(
            f"{reader.where}: rope parameters per layer type ({', '.join(nested)}) are not "
            "supported; protoformer uses one rotary table for every layer")
    rope = ConfigReader(params, f"{reader.where} rope parameters")
    rope_type = rope.get_str("rope_type", rope.get_str("type", "default"))
    theta = rope.get_float("rope_theta", reader.get_float("rope_theta", 10000.0))
    partial = read_partial_rotary_factor(reader, rope)
    if partial != 1.0 and not partial_rotary:
        raise UnsupportedHFModelError(
            f"{reader.where}: partial_rotary_factor={partial} is not supported; the "
            f"{reader.where} layers rotate whole heads only")
    return rope_type, theta, rope


def read_partial_rotary_factor(reader: ConfigReader, rope: ConfigReader,
                              key: str = "partial_rotary_factor", default: float = 1.0) -> float:
    """The fraction of each head's channels that rotate (`rope` parameters first, then the
    top-level `key`, else `default`), in (0, 1]."""
    partial = rope.get_float("partial_rotary_factor", reader.get_float(key, default))
    if not 0.0 < partial <= 1.0:
        raise HFConversionError(f"{reader.where}: {key}={partial} must be in (0, 1]")
    return partial


def activation_name(config: TransformerConfig) -> str:
    """The Hugging Face `hidden_act` of `config.activation_func`."""
    for name, function in ACTIVATIONS.items():
        if config.activation_func is function:
            return name
    raise UnsupportedHFModelError(
        f"activation_func={config.activation_func!r} has no Hugging Face name; export supports "
        "torch.nn.functional.silu, gelu, relu and protoformer.transformer.mlp.gelu_tanh")


def format_layer_list(layers: Sequence[int]) -> str:
    """`[3, 4, 5, 9]` -> `"3-5, 9"`."""
    parts: list[str] = []
    start = previous = layers[0]
    for layer in [*layers[1:], None]:
        if layer is not None and layer == previous + 1:
            previous = layer
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if layer is not None:
            start = previous = layer
    return ", ".join(parts)


# ------------------------------------------------------------------ tensor rules
ToOurs = Callable[[Sequence[Tensor]], Tensor]
ToTheirs = Callable[[Tensor], tuple[Tensor, ...]]


def owned(t: Tensor) -> Tensor:
    """A contiguous copy with its own storage (saved tensors must not share memory)."""
    return t.clone(memory_format=torch.contiguous_format)


def _single(parts: Sequence[Tensor]) -> Tensor:
    return parts[0]


def _as_tuple(t: Tensor) -> tuple[Tensor, ...]:
    return (t,)


@dataclass(frozen=True)
class TensorRule:
    """One protoformer tensor `ours` <-> the Hugging Face tensors `theirs`, both directions."""

    ours: str
    theirs: tuple[str, ...]
    to_ours: ToOurs = _single
    to_theirs: ToTheirs = _as_tuple


def same(ours: str, theirs: str) -> TensorRule:
    """A tensor stored identically under two names."""
    return TensorRule(ours, (theirs,))


def _cat_rows(parts: Sequence[Tensor]) -> Tensor:
    return torch.cat(tuple(parts), dim=0)  # [2 * ffn, ...]: gate rows then up rows


def _split_halves(t: Tensor) -> tuple[Tensor, ...]:
    gate, up = torch.chunk(t, 2, dim=0)  # [ffn, ...] each
    return owned(gate), owned(up)


def gate_up_rule(ours: str, gate: str, up: str) -> TensorRule:
    """A gated `linear_fc1` tensor: the gate projection's rows, then the up projection's."""
    return TensorRule(ours, (gate, up), _cat_rows, _split_halves)


def mlp_rules(config: TransformerConfig, ours: str, theirs: str) -> list[TensorRule]:
    """The gated MLP: `linear_fc1 = [gate_proj; up_proj]`, `linear_fc2 = down_proj`."""
    kinds = ("weight", "bias") if config.add_bias_linear else ("weight",)
    rules: list[TensorRule] = []
    for kind in kinds:
        rules.append(gate_up_rule(f"{ours}.linear_fc1.{kind}", f"{theirs}.gate_proj.{kind}",
                                  f"{theirs}.up_proj.{kind}"))
    for kind in kinds:
        rules.append(same(f"{ours}.linear_fc2.{kind}", f"{theirs}.down_proj.{kind}"))
    return rules


# (info, layer index, our layer prefix, their layer prefix) -> the rules of that layer's MLP.
MLPLayerRules = Callable[[HFModelInfo, int, str, str], list[TensorRule]]


def dense_mlp_layer_rules(info: HFModelInfo, index: int, ours: str, theirs: str) -> list[TensorRule]:
    """`mlp_rules` of layer `ours`'s `mlp` <-> `theirs`'s `mlp` (the default of `model_rules`)."""
    del index  # every layer's MLP is the same kind
    return mlp_rules(info.config, f"{ours}.mlp", f"{theirs}.mlp")


def model_rules(info: HFModelInfo,
                layer_rules: Callable[[HFModelInfo, str, str], list[TensorRule]],
                mlp_layer_rules: MLPLayerRules = dense_mlp_layer_rules) -> list[TensorRule]:
    """Every tensor of the model: embedding, each layer (attention via `layer_rules`, the MLP
    via `mlp_layer_rules`, e.g. dense or mixture-of-experts per layer), final norm, head."""
    rules = [same("embedding.weight", "model.embed_tokens.weight")]
    for index in range(info.config.num_layers):
        ours, theirs = f"decoder.layers.{index}", f"model.layers.{index}"
        rules.append(same(f"{ours}.input_layernorm.weight", f"{theirs}.input_layernorm.weight"))
        rules.extend(layer_rules(info, f"{ours}.self_attention", f"{theirs}.self_attn"))
        rules.append(same(f"{ours}.pre_mlp_layernorm.weight",
                          f"{theirs}.post_attention_layernorm.weight"))
        rules.extend(mlp_layer_rules(info, index, ours, theirs))
    rules.append(same("decoder.final_layernorm.weight", "model.norm.weight"))
    if not info.tie_word_embeddings:
        rules.append(same("output_layer.weight", "lm_head.weight"))
    return rules
