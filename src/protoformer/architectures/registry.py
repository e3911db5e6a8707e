"""The extension point for model families: one object per Hugging Face `model_type`.

A family module (`architectures/llama.py`, `architectures/deepseek_v3.py`, ...) builds one
object satisfying `CausalLMArchitecture` (or `Seq2SeqArchitecture` for encoder-decoder models)
per `model_type` it reads, and calls `register_architecture` on it when imported. Everything
that depends on the architecture — `from_hf`/`to_hf`/`save_hf`, the `protoformer` command's
`generate --hf` and `train --init-from-hf` — looks the object up here by `model_type`; no
other module switches on model types or on config classes.

    class MyArchitecture:               # structurally a CausalLMArchitecture
        model_type = "my_model"
        hf_class = "MyModelForCausalLM"
        exports_by_default = False
        def read_config(self, values, dtype): ...     # config.json -> HFModelInfo
        def layer_spec(self, backend, info): ...      # the layer recipe
        def tensor_rules(self, info): ...             # our tensor <-> theirs, both ways
        def write_config(self, config, sizes): ...    # our config -> config.json

    register_architecture(MyArchitecture())
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from protoformer.architectures.conversion import (
    HFModelInfo,
    JSONDict,
    Seq2SeqModelInfo,
    TensorRule,
    UnsupportedHFModelError,
)
from protoformer.backends.base import BackendSpecProvider
from protoformer.config import TransformerConfig
from protoformer.models.t5 import T5Model
from protoformer.transformer.block import LayerSpecs

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "CausalLMArchitecture",
    "ModelSizes",
    "Seq2SeqArchitecture",
    "causal_lm_architecture",
    "default_export_architectures",
    "refuse_model_type",
    "register_architecture",
    "register_seq2seq_architecture",
    "registered_model_types",
    "renamed_tensors",
    "seq2seq_architecture",
    "supported_list",
    "unused_tensor_suffixes",
]


@dataclass(frozen=True)
class ModelSizes:
    """The model-level values a config.json states besides the layer config."""

    vocab_size: int
    max_sequence_length: int
    tie_word_embeddings: bool


class CausalLMArchitecture(Protocol):
    """A Hugging Face decoder-only architecture: how protoformer reads, builds and writes it."""

    @property
    def model_type(self) -> str:
        """The config.json `model_type` this object handles (the registry key)."""
        ...

    @property
    def hf_class(self) -> str:
        """The transformers class written to config.json `architectures`, e.g. `LlamaForCausalLM`."""
        ...

    @property
    def exports_by_default(self) -> bool:
        """Whether `save_hf` of a model that was not read from Hugging Face may choose this
        architecture (the first registered one whose `write_config` accepts the model wins)."""
        ...

    def read_config(self, values: Mapping[str, object], dtype: torch.dtype) -> HFModelInfo:
        """config.json values -> protoformer's config and model sizes (parameters in `dtype`).

        Raises `UnsupportedHFModelError` naming a feature protoformer cannot represent and
        `HFConversionError` for missing or ill-typed values.
        """
        ...

    def layer_spec(self, backend: BackendSpecProvider, info: HFModelInfo) -> LayerSpecs:
        """The layer recipe of the model `info` describes, from `backend`'s builders: one spec
        for every layer, or one per layer (e.g. alternating local and global attention)."""
        ...

    def tensor_rules(self, info: HFModelInfo) -> list[TensorRule]:
        """Every tensor of the model, protoformer's name <-> the checkpoint's, both directions."""
        ...

    def write_config(self, config: TransformerConfig, sizes: ModelSizes) -> JSONDict:
        """The config.json values of a protoformer model with `config` and `sizes`.

        Raises `UnsupportedHFModelError` listing what this architecture cannot represent.
        """
        ...


class Seq2SeqArchitecture(Protocol):
    """A Hugging Face encoder-decoder architecture (T5 and its relatives), loaded as a `T5Model`."""

    @property
    def model_type(self) -> str:
        """The config.json `model_type` this object handles (the registry key)."""
        ...

    @property
    def hf_class(self) -> str:
        """The transformers class, e.g. `T5ForConditionalGeneration`."""
        ...

    def read_config(self, values: Mapping[str, object], dtype: torch.dtype, *,
                    tied: bool) -> Seq2SeqModelInfo:
        """config.json values -> both stacks' configs and the model options (`tied`: whether
        the checkpoint's output layer equals its embedding)."""
        ...

    def tensor_rules(self, info: Seq2SeqModelInfo) -> list[TensorRule]:
        """Every tensor of the model, protoformer's name <-> the checkpoint's, both directions."""
        ...

    def write_config(self, model: T5Model) -> JSONDict:
        """The config.json values of `model`; `UnsupportedHFModelError` if not representable."""
        ...


# model_type -> the transformers class, in registration order (for messages and `interop`).
SUPPORTED_ARCHITECTURES: dict[str, str] = {}
_CAUSAL: dict[str, CausalLMArchitecture] = {}
_SEQ2SEQ: dict[str, Seq2SeqArchitecture] = {}
_RENAMED: dict[str, dict[str, str]] = {}
_UNUSED: dict[str, tuple[str, ...]] = {}
# model_type -> why it is refused (a family's unsupported relative, e.g. a multimodal variant).
_REFUSED: dict[str, str] = {}


def _claim(model_type: str, hf_class: str) -> None:
    if model_type in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"model_type {model_type!r} is already registered "
                         f"({SUPPORTED_ARCHITECTURES[model_type]}); a model type has one "
                         "architecture")
    SUPPORTED_ARCHITECTURES[model_type] = hf_class


def register_architecture(architecture: CausalLMArchitecture, *,
                          renamed_tensors: Mapping[str, str] | None = None,
                          unused_tensor_suffixes: tuple[str, ...] = ()) -> None:
    """Make `architecture` the handler of its `model_type` (a family owns its model types:
    registering one twice is an error). `renamed_tensors`: names older checkpoint files use
    -> the names `tensor_rules` read (e.g. GPT-NeoX's `embed_out.weight` -> `lm_head.weight`),
    applied when loading; `unused_tensor_suffixes`: stored buffers older files carry that the
    model recomputes (e.g. GPT-NeoX's `attention.bias` causal mask), skipped with a warning."""
    _claim(architecture.model_type, architecture.hf_class)
    _CAUSAL[architecture.model_type] = architecture
    if renamed_tensors:
        _RENAMED[architecture.model_type] = dict(renamed_tensors)
    if unused_tensor_suffixes:
        _UNUSED[architecture.model_type] = unused_tensor_suffixes


def unused_tensor_suffixes(model_type: str) -> tuple[str, ...]:
    """Suffixes of stored tensors `model_type`'s loader skips (see `register_architecture`)."""
    return _UNUSED.get(model_type, ())


def renamed_tensors(model_type: str) -> Mapping[str, str]:
    """Older tensor names -> current ones for `model_type` (empty for most families)."""
    return _RENAMED.get(model_type, {})


def register_seq2seq_architecture(architecture: Seq2SeqArchitecture) -> None:
    """`register_architecture` for an encoder-decoder architecture."""
    _claim(architecture.model_type, architecture.hf_class)
    _SEQ2SEQ[architecture.model_type] = architecture


def refuse_model_type(model_type: str, reason: str) -> None:
    """Make `causal_lm_architecture` refuse `model_type` with `reason` (completing "Hugging Face
    model_type=... "), for a relative of a supported family that protoformer cannot build."""
    _REFUSED[model_type] = reason


def registered_model_types() -> list[str]:
    """Every registered `model_type`, in registration order."""
    return list(SUPPORTED_ARCHITECTURES)


def supported_list(*, encoder_decoder: bool = False) -> str:
    """The supported `model_type`s with their classes, for error messages."""
    table = _SEQ2SEQ if encoder_decoder else _CAUSAL
    return ", ".join(f"{kind} ({arch.hf_class})" for kind, arch in table.items())


def _named(values: Mapping[str, object]) -> str:
    architectures = values.get("architectures")
    if isinstance(architectures, list):
        return f" ({', '.join(map(str, architectures))})"  # pyright: ignore[reportUnknownArgumentType]  # JSON list
    return ""


def causal_lm_architecture(values: Mapping[str, object]) -> CausalLMArchitecture:
    """The decoder-only architecture of a config.json mapping, by its `model_type`.

    Raises `UnsupportedHFModelError` naming the model type and the supported ones.
    """
    kind = values.get("model_type")
    if isinstance(kind, str) and kind in _CAUSAL:
        return _CAUSAL[kind]
    if isinstance(kind, str) and kind in _SEQ2SEQ:
        raise UnsupportedHFModelError(
            f"Hugging Face model_type={kind!r} is an encoder-decoder model; load it with "
            "protoformer.interop.t5_from_hf, which returns a T5Model")
    if isinstance(kind, str) and kind in _REFUSED:
        raise UnsupportedHFModelError(f"Hugging Face model_type={kind!r} {_REFUSED[kind]}")
    raise UnsupportedHFModelError(
        f"Hugging Face model_type={kind!r}{_named(values)} is not supported; protoformer.interop "
        f"converts {supported_list()}; encoder-decoder: {supported_list(encoder_decoder=True)}")


def seq2seq_architecture(values: Mapping[str, object]) -> Seq2SeqArchitecture | None:
    """The encoder-decoder architecture of a config.json mapping, or None for any other model."""
    kind = values.get("model_type")
    return _SEQ2SEQ.get(kind) if isinstance(kind, str) else None


def default_export_architectures() -> list[CausalLMArchitecture]:
    """The architectures `save_hf` tries, in order, for a model not read from Hugging Face."""
    return [arch for arch in _CAUSAL.values() if arch.exports_by_default]
