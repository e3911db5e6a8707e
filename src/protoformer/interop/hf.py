"""Hugging Face checkpoints in and out: `from_hf`, `to_hf`, `save_hf`.

    model = from_hf("path/to/Llama-3.2-1B")          # a directory: config.json + safetensors
    model = from_hf(hf_model)                         # a transformers model instance
    save_hf(model, "out/")                            # loadable by AutoModelForCausalLM

Supported: the architectures registered in `protoformer.architectures`, found by the config's
`model_type` (Llama, Mistral, Qwen2, Qwen3, DeepSeek-V3, Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE, ...). Loading a directory reads config.json and the safetensors files
directly, so it does not need transformers. Every tensor of the checkpoint must be used and
every parameter filled: missing or unexpected tensors raise `HFConversionError` listing them.
Exceptions: a tied model's `lm_head.weight` (checked equal to the embedding), and, with a
warning naming them, DeepSeek's multi-token-prediction layers and old checkpoints' stored
rotary tables (`rotary_emb.inv_freq`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Union

import torch
from torch import Tensor, nn

from protoformer.architectures import (
    CausalLMArchitecture,
    ModelSizes,
    causal_lm_architecture,
)
from protoformer.architectures.conversion import (
    HFConversionError,
    HFModelInfo,
    JSONDict,
    TensorRule,
    UnsupportedHFModelError,
)
from protoformer.architectures.moe_conversion import uses_fused_experts
from protoformer.architectures.registry import (
    default_export_architectures,
    renamed_tensors,
    unused_tensor_suffixes,
)
from protoformer.backends import get_backend
from protoformer.config import TransformerConfig
from protoformer.interop.hf_files import (
    RenamedSource,
    SafetensorsSource,
    StateDictSource,
    TensorSource,
    load_rules,
    name_listing,
    natural_order,
    read_config,
    write_safetensors,
)
from protoformer.models import GPTModel
from protoformer.transformer.block import per_layer_specs

__all__ = [
    "HFConversionError",
    "HFSource",
    "UnsupportedHFModelError",
    "from_hf",
    "hf_config_dict",
    "hf_model_info",
    "model_from_hf_config",
    "open_hf_source",
    "parse_hf_config",
    "save_hf",
    "to_hf",
]

HFSource = Union[str, "os.PathLike[str]", nn.Module]
"""A checkpoint directory or a transformers `PreTrainedModel` instance."""

HFConfigLike = Union[Mapping[str, object], object]
"""A config.json mapping or a transformers `PretrainedConfig` (anything with `to_dict()`)."""

# The description each model made by `from_hf` was read from, so `to_hf`/`save_hf` write
# the same layout and config back (e.g. DeepSeek's rope_interleave, the token ids).
_ORIGINS: weakref.WeakKeyDictionary[GPTModel, HFModelInfo] = weakref.WeakKeyDictionary()


# ------------------------------------------------------------------ configs
def _jsonable(value: object) -> object:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    raise TypeError(f"config value {value!r} is not JSON-serialisable")


def _config_values(config: HFConfigLike, where: str) -> JSONDict:
    """A plain JSON mapping from a mapping or an object with `to_dict()`."""
    values: object = config
    if not isinstance(config, Mapping):
        to_dict: object = getattr(config, "to_dict", None)
        if not callable(to_dict):
            raise TypeError(f"{where}: expected a config.json mapping or a transformers config "
                            f"(with to_dict()), got {type(config).__qualname__}")
        values = to_dict()
    if not isinstance(values, Mapping):
        raise TypeError(f"{where}: the config is not a mapping ({type(values).__qualname__})")
    # A JSON round trip: plain values only (dtypes become names), and a private copy.
    text = json.dumps(dict(values), default=_jsonable)  # pyright: ignore[reportUnknownArgumentType]  # checked Mapping
    decoded: dict[str, object] = json.loads(text)
    return decoded


def parse_hf_config(config: HFConfigLike, *, dtype: torch.dtype = torch.float32) -> HFModelInfo:
    """Describe a Hugging Face config in protoformer's terms (parameters in `dtype`).

    Raises `UnsupportedHFModelError` for an architecture or feature protoformer cannot
    represent exactly (naming it and what is supported) and `HFConversionError` for a config
    with missing or ill-typed values.
    """
    values = _config_values(config, "parse_hf_config")
    return causal_lm_architecture(values).read_config(values, dtype)


def _export_config(model: GPTModel) -> JSONDict:
    """The config.json of the first default-export architecture that can represent `model`."""
    if model.position_embedding_type != "rope":
        raise UnsupportedHFModelError(f"position_embedding_type={model.position_embedding_type!r}: "
                                      "the Hugging Face architectures use rotary embeddings")
    sizes = ModelSizes(vocab_size=model.vocab_size, max_sequence_length=model.max_sequence_length,
                       tie_word_embeddings=model.share_embeddings_and_output_weights)
    refusals: list[str] = []
    for architecture in default_export_architectures():
        try:
            return architecture.write_config(model.config, sizes)
        except UnsupportedHFModelError as refusal:
            refusals.append(str(refusal))
    raise UnsupportedHFModelError("no Hugging Face architecture represents this model; pass "
                                  "config= to name one:\n  " + "\n  ".join(refusals))


def _model_dtype(model: GPTModel) -> torch.dtype:
    return model.embedding.weight.dtype


def _compare(config: TransformerConfig, expected: HFModelInfo) -> list[str]:
    """How `config` differs from the one `expected` was read as, in the fields it describes."""
    if type(config) is not type(expected.config):
        return [f"the config is a {type(expected.config).__name__}, the model's a "
                f"{type(config).__name__}"]
    problems: list[str] = []
    for name in expected.described_fields:
        ours: object = getattr(config, name)
        theirs: object = getattr(expected.config, name)
        if isinstance(ours, float) and isinstance(theirs, float):
            same_value = math.isclose(ours, theirs, rel_tol=1e-9, abs_tol=1e-12)
        elif callable(ours):
            same_value = ours is theirs
        else:
            same_value = ours == theirs
        if not same_value:
            problems.append(f"{name}: model {ours!r}, config {theirs!r}")
    return problems


def hf_model_info(model: GPTModel, config: HFConfigLike | None = None) -> HFModelInfo:
    """The Hugging Face description of `model`: from `config` if given, else the one `from_hf`
    read it from, else derived from the model's own config (Llama/Qwen2/Qwen3/DeepSeek-V3).

    Raises `ValueError` when `config` does not describe `model`'s shapes and options.
    """
    if not isinstance(model, GPTModel):  # pyright: ignore[reportUnnecessaryIsInstance]  # user input
        raise TypeError(f"expected a protoformer GPTModel, got {type(model).__qualname__}")
    if model.pg.tp_size > 1:
        raise UnsupportedHFModelError("exporting a tensor-parallel model is not supported; "
                                      "convert the single-process model")
    dtype = _model_dtype(model)
    if config is not None:
        info = parse_hf_config(config, dtype=dtype)
    elif model in _ORIGINS:
        return _ORIGINS[model]
    else:
        info = parse_hf_config(_export_config(model), dtype=dtype)
    problems = _compare(model.config, info) + _compare_layers(model, info)
    if info.vocab_size != model.vocab_size:
        problems.append(f"vocab_size: model {model.vocab_size}, config {info.vocab_size}")
    if info.tie_word_embeddings != model.share_embeddings_and_output_weights:
        problems.append(f"tie_word_embeddings: model {model.share_embeddings_and_output_weights}, "
                        f"config {info.tie_word_embeddings}")
    if problems:
        raise ValueError(f"the {info.architecture} config does not describe this model:\n  "
                         + "\n  ".join(problems))
    return info


def _compare_layers(model: GPTModel, info: HFModelInfo) -> list[str]:
    """What the layer recipe of `info` wires differently from `model`'s layers (the residual
    arrangement; the config fields are `_compare`'s)."""
    if len(model.decoder.layers) != info.config.num_layers:
        return []  # `_compare` reports num_layers
    specs = per_layer_specs(_architecture(info).layer_spec(get_backend("local"), info),
                            info.config.num_layers)
    wanted = {spec.parallel_residual for spec in specs}
    have = {bool(getattr(layer, "parallel_residual", False)) for layer in model.decoder.layers}
    if have != wanted:
        return [f"parallel_residual: model {sorted(have)}, config {sorted(wanted)}"]
    return []


def hf_config_dict(model: GPTModel, config: HFConfigLike | None = None) -> JSONDict:
    """The config.json mapping `save_hf` writes for `model` (see `hf_model_info`)."""
    info = hf_model_info(model, config)
    values = {key: value for key, value in info.hf_config.items() if not key.startswith("_")}
    values["architectures"] = [info.architecture]
    values["model_type"] = info.model_type
    dtype_name = str(_model_dtype(model)).removeprefix("torch.")
    values["torch_dtype"] = dtype_name
    if "dtype" in values:
        values["dtype"] = dtype_name
    return values


# ------------------------------------------------------------------ tensors
def _architecture(info: HFModelInfo) -> CausalLMArchitecture:
    return causal_lm_architecture({"model_type": info.model_type})


def tensor_rules(info: HFModelInfo) -> list[TensorRule]:
    """The conversion rule of every tensor of `info`'s model."""
    return _architecture(info).tensor_rules(info)


def _check_names(info: HFModelInfo, rules: list[TensorRule], source: TensorSource) -> None:
    expected = {name for rule in rules for name in rule.theirs}
    present = set(source.names())
    missing = sorted(expected - present, key=natural_order)
    unexpected: list[str] = []
    ignored: list[str] = []
    layers = info.config.num_layers
    for name in sorted(present - expected, key=natural_order):
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if name == "lm_head.weight" and info.tie_word_embeddings:
            embedding = "model.embed_tokens.weight"
            if embedding in present and not torch.equal(source.get(name), source.get(embedding)):
                raise HFConversionError(
                    f"{source.where}: tie_word_embeddings is true but lm_head.weight differs "
                    "from model.embed_tokens.weight; set tie_word_embeddings=false in the config")
        elif layer is not None and layers <= int(layer.group(1)) < layers + info.extra_layers:
            ignored.append(name)
        elif name.endswith(("rotary_emb.inv_freq", *unused_tensor_suffixes(info.model_type))):
            ignored.append(name)
        else:
            unexpected.append(name)
    if missing or unexpected:
        raise HFConversionError(
            f"{source.where}: the tensors do not match the {info.architecture} layout its config "
            "describes" + (name_listing("missing", missing) if missing else "")
            + (name_listing("unexpected", unexpected) if unexpected else "")
            + "\nCheck that config.json belongs to these weights (a *ForCausalLM checkpoint).")
    if ignored:
        extra = (f"DeepSeek multi-token-prediction layers {layers}..."
                 f"{layers + info.extra_layers - 1}, " if info.extra_layers else "")
        warnings.warn(f"{source.where}: not loading {len(ignored)} tensor(s) protoformer does not "
                      f"use ({extra}stored rotary tables or attention-mask buffers): "
                      f"{', '.join(ignored[:5])}{' ...' if len(ignored) > 5 else ''}",
                      stacklevel=3)


def _build(info: HFModelInfo, device: torch.device | str | None) -> GPTModel:
    spec = _architecture(info).layer_spec(get_backend("local"), info)
    placement = torch.device(device) if device is not None else contextlib.nullcontext()
    with placement:
        return GPTModel(info.config, spec, info.vocab_size, info.max_sequence_length,
                        share_embeddings_and_output_weights=info.tie_word_embeddings)


def open_hf_source(source: HFSource) -> tuple[JSONDict, TensorSource]:
    """The config values and a tensor reader of a checkpoint directory or a transformers model."""
    if isinstance(source, (str, os.PathLike)):
        directory = Path(source)
        if not directory.is_dir():
            raise HFConversionError(f"{directory}: not a directory; from_hf expects a Hugging "
                                    "Face checkpoint directory or a transformers model")
        return read_config(directory), SafetensorsSource(directory)
    if isinstance(source, nn.Module):  # pyright: ignore[reportUnnecessaryIsInstance]  # user input
        where = type(source).__name__
        config: object = getattr(source, "config", None)
        if config is None:
            raise TypeError(f"from_hf: {where} has no .config; pass a transformers "
                            "PreTrainedModel such as LlamaForCausalLM")
        return _config_values(config, where), StateDictSource(source.state_dict(), where)
    raise TypeError(f"from_hf expects a checkpoint directory or a transformers model, got "
                    f"{type(source).__qualname__}")


def _embedding_dtype(info: HFModelInfo, tensors: TensorSource) -> torch.dtype | None:
    names = set(tensors.names())
    for rule in tensor_rules(info):
        if rule.ours == "embedding.weight" and rule.theirs[0] in names:
            return tensors.dtype(rule.theirs[0])
    return None


def from_hf(source: HFSource, *, dtype: torch.dtype | None = None,
            device: torch.device | str | None = None) -> GPTModel:
    """A protoformer `GPTModel` with the weights of a Hugging Face causal LM.

    `source`: a checkpoint directory (config.json with model.safetensors or sharded
    model-0000x-of-0000y.safetensors and model.safetensors.index.json; read without
    transformers and without network) or a transformers `PreTrainedModel`. `dtype`: the
    parameters' dtype (default: the checkpoint's); `device`: where to build the model.
    The model is single-process (no tensor parallelism), in training mode like any new
    module: call `.eval()` for inference.
    """
    values, tensors = open_hf_source(source)
    info = parse_hf_config(values, dtype=dtype if dtype is not None else torch.float32)
    renamed = renamed_tensors(info.model_type)
    if renamed:
        tensors = RenamedSource(tensors, renamed)
    if dtype is None:  # the checkpoint's: that of the tensor our embedding is made from
        stored = _embedding_dtype(info, tensors)
        if stored is not None and stored != torch.float32:
            info = parse_hf_config(values, dtype=stored)
    if uses_fused_experts(tensors.names()):  # a transformers 5 model's routed experts
        info = dataclasses.replace(info, fused_experts=True)
    rules = tensor_rules(info)
    _check_names(info, rules, tensors)
    model = _build(info, device)
    load_rules(model, rules, tensors)
    # Built without random initialisation (every weight is loaded); a model rebuilt from
    # this config later should initialise its weights as usual.
    info.config.perform_initialization = True
    _ORIGINS[model] = info
    return model


def model_from_hf_config(config: HFConfigLike, *, dtype: torch.dtype = torch.float32,
                         device: torch.device | str | None = None) -> GPTModel:
    """A freshly initialised protoformer model of a Hugging Face config's architecture (no weights).

    For rebuilding a model before loading a protoformer checkpoint of it; `to_hf`/`save_hf`
    of the result write this config.
    """
    info = parse_hf_config(config, dtype=dtype)
    info.config.perform_initialization = True
    model = _build(info, device)
    _ORIGINS[model] = info
    return model


def to_hf(model: GPTModel, *, config: HFConfigLike | None = None,
          fused_experts: bool | None = None) -> dict[str, Tensor]:
    """`model`'s weights as a Hugging Face state dict (the names and layout of `*ForCausalLM`).

    The architecture comes from `config` if given, else from the checkpoint `from_hf` read,
    else from the model's config (see `hf_model_info`). As in a transformers model's
    `state_dict()`, a tied model lists `lm_head.weight` too (the embedding tensor itself).
    Tensors that are stored unchanged share memory with the model's parameters.
    Mixture-of-experts models: `fused_experts=True` gives each layer's routed experts as
    transformers 5 models hold them (`experts.gate_up_proj`, `experts.down_proj`), False one
    tensor per expert as checkpoint files store them; None (default) the layout `from_hf`
    read, else per expert.
    """
    info = hf_model_info(model, config)
    if fused_experts is not None and fused_experts != info.fused_experts:
        info = dataclasses.replace(info, fused_experts=fused_experts)
    state = model.state_dict()
    rules = tensor_rules(info)
    absent = [rule.ours for rule in rules if rule.ours not in state]
    if absent:
        raise UnsupportedHFModelError(
            f"this model has no {', '.join(absent[:3])}{' ...' if len(absent) > 3 else ''} "
            f"({len(absent)} tensor(s)) that {info.architecture} needs: its layer spec is not "
            f"that architecture's (e.g. another q/k norm); export it with a config it fits")
    tensors: dict[str, Tensor] = {}
    for rule in rules:
        parts = rule.to_theirs(state[rule.ours].detach())
        tensors.update(zip(rule.theirs, parts, strict=True))
    if info.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    return tensors


def save_hf(model: GPTModel, directory: str | os.PathLike[str], *,
            config: HFConfigLike | None = None, max_shard_size: int | None = None) -> Path:
    """Write `model` as a Hugging Face checkpoint: config.json and safetensors weights.

    `AutoModelForCausalLM.from_pretrained(directory)` loads the result. `config` as in
    `to_hf`; `max_shard_size` (bytes) splits the weights into shards with an index. A tied
    model's `lm_head.weight` is not stored (transformers re-ties it). Returns the directory.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    values = hf_config_dict(model, config)
    tensors = to_hf(model, config=config, fused_experts=False)  # the layout every version reads
    if model.share_embeddings_and_output_weights:
        del tensors["lm_head.weight"]
    write_safetensors(path, tensors, max_shard_size=max_shard_size)
    (path / "config.json").write_text(json.dumps(values, indent=2, sort_keys=True) + "\n",
                                      encoding="utf-8")
    return path
