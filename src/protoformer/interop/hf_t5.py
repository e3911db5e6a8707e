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
import weakref
from pathlib import Path

import torch
from torch import Tensor

from protoformer.architectures import Seq2SeqArchitecture, seq2seq_architecture
from protoformer.architectures.conversion import (
    HFConversionError,
    JSONDict,
    Seq2SeqModelInfo,
    TensorRule,
    UnsupportedHFModelError,
    owned,
)
from protoformer.architectures.registry import supported_list
from protoformer.backends import get_backend
from protoformer.interop.hf import open_hf_source
from protoformer.interop.hf_files import (
    TensorSource,
    load_rules,
    name_listing,
    natural_order,
    write_safetensors,
)
from protoformer.models.t5 import T5Model
from protoformer.recipes.t5 import t5_decoder_layer_spec, t5_encoder_layer_spec

__all__ = ["save_t5_hf", "t5_from_hf", "t5_hf_config", "t5_to_hf"]

_TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")

# The architecture each model made by `t5_from_hf` was read as (T5 or mT5), so `t5_to_hf`
# writes the same `model_type` back.
_ORIGINS: weakref.WeakKeyDictionary[T5Model, Seq2SeqArchitecture] = weakref.WeakKeyDictionary()


def _architecture_of(values: JSONDict) -> Seq2SeqArchitecture:
    architecture = seq2seq_architecture(values)
    if architecture is None:
        raise UnsupportedHFModelError(
            f"model_type={values.get('model_type')!r}: t5_from_hf converts the encoder-decoder "
            f"architectures {supported_list(encoder_decoder=True)}")
    return architecture


def _default_architecture() -> Seq2SeqArchitecture:
    return _architecture_of({"model_type": "t5"})


def _check_names(info: Seq2SeqModelInfo, rules: list[TensorRule], source: TensorSource,
                 tied: bool) -> None:
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
            f"{source.where}: the tensors do not match the {info.architecture} layout its "
            "config describes"
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
    architecture = _architecture_of(values)
    info = architecture.read_config(
        values, dtype if dtype is not None else tensors.dtype("shared.weight"), tied=tied)
    rules = architecture.tensor_rules(info)
    _check_names(info, rules, tensors, tied)
    placement = torch.device(device) if device is not None else contextlib.nullcontext()
    backend = get_backend("local")
    with placement:
        model = T5Model(info.config, t5_encoder_layer_spec(backend, info.encoder_config),
                        t5_decoder_layer_spec(backend, info.config), info.vocab_size,
                        max_sequence_length, encoder_config=info.encoder_config,
                        relative_attention_num_buckets=info.relative_attention_num_buckets,
                        relative_attention_max_distance=info.relative_attention_max_distance,
                        share_embeddings_and_output_weights=tied,
                        scale_decoder_outputs=info.scale_decoder_outputs)
    load_rules(model, rules, tensors)
    _ORIGINS[model] = architecture
    for config in (info.config, info.encoder_config):
        config.perform_initialization = True  # a model rebuilt from it initialises as usual
    return model


def _model_architecture(model: T5Model) -> Seq2SeqArchitecture:
    return _ORIGINS.get(model) or _default_architecture()


def t5_hf_config(model: T5Model) -> JSONDict:
    """The Hugging Face `config.json` values describing `model` (as the architecture it was
    read as, else a T5ForConditionalGeneration)."""
    return _model_architecture(model).write_config(model)


def t5_to_hf(model: T5Model) -> dict[str, Tensor]:
    """`model`'s weights under Hugging Face T5 names (tied copies included, as `state_dict()` has)."""
    architecture = _model_architecture(model)
    info = architecture.read_config(architecture.write_config(model), model.embedding.weight.dtype,
                                    tied=model.share_embeddings_and_output_weights)
    state = model.state_dict()
    tensors: dict[str, Tensor] = {}
    for rule in architecture.tensor_rules(info):
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
