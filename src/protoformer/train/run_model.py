"""The model a training run trains, and what its checkpoints record to rebuild it.

A run trains a preset's model (with the layer spec a spec file and `--set` overrides
describe, if given) or a Hugging Face checkpoint's (architecture and weights). A resumed run
rebuilds the model from what its checkpoint stored (the resolved layer spec, the Hugging Face
config), not from files that may have changed since.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from protoformer.backends import BackendSpecProvider
from protoformer.config import TransformerConfig
from protoformer.interop import (
    from_hf,
    hf_config_dict,
    hf_model_info,
    model_from_hf_config,
    parse_hf_config,
)
from protoformer.interop.hf_files import read_config
from protoformer.memory import check_fits, estimate_model_memory
from protoformer.models import GPTModel
from protoformer.models.stage_parts import StageParts
from protoformer.parallel.groups import ProcessGroups
from protoformer.recipes import Preset
from protoformer.recipes.spec_data import LayerSpecList, layer_spec_from_data, stored_layer_spec
from protoformer.spec import to_dict
from protoformer.train.checkpoint_files import STATE_FILE, JSONValue
from protoformer.train.data import BYTE_VOCAB_SIZE
from protoformer.train.options import TrainOptions

__all__ = ["VOCAB_PADDING", "RunModel", "build_hf_model", "build_preset_model", "check_sizes",
           "check_training_memory", "run_vocab_size"]


@dataclass(frozen=True)
class RunModel:
    """The model a run trains, and what its checkpoints record to rebuild it."""

    model: GPTModel
    name: str  # for messages and the loss curve's title
    preset: Preset | None  # None: from a Hugging Face checkpoint
    hf_config: dict[str, JSONValue] | None
    layer_spec: dict[str, JSONValue] | None  # the resolved spec(s), when --spec/--set gave them


VOCAB_PADDING = 128
"""A run's own tokenizer sizes a preset's vocabulary up to a multiple of this (times the
tensor-parallel size), as Megatron's `--make-vocab-size-divisible-by` does."""


def run_vocab_size(preset_vocab_size: int, tokenizer_vocab_size: int, *, is_bytes: bool,
                   tp_size: int) -> int:
    """A preset's vocabulary for a run: its own for bytes, else the tokenizer's, padded."""
    if is_bytes:
        return preset_vocab_size
    multiple = VOCAB_PADDING * tp_size
    return -(-tokenizer_vocab_size // multiple) * multiple


def check_sizes(name: str, vocab_size: int, max_sequence_length: int,
                options: TrainOptions, *, tokenizer_vocab_size: int = BYTE_VOCAB_SIZE) -> None:
    """Refuse a model the run cannot feed: fewer token ids than the tokenizer's, too short."""
    if vocab_size < tokenizer_vocab_size:
        raise ValueError(f"{name} has a vocabulary of {vocab_size}, but the run's tokenizer "
                         f"makes {tokenizer_vocab_size} token ids; use a tokenizer that fits the "
                         "model (--tokenizer), or the model's own")
    if options.seq_len > max_sequence_length:
        raise ValueError(f"seq_len={options.seq_len} exceeds {name}'s "
                         f"max_sequence_length={max_sequence_length}")


def check_training_memory(config: TransformerConfig, vocab_size: int, *, tied: bool,
                          device: torch.device, tp_size: int, name: str,
                          parts: StageParts | None = None) -> None:
    """Refuse, before building, a model whose weights, gradients and AdamW state do not fit in
    `device`'s free memory (`protoformer.memory`; one line naming the estimate); with `parts`,
    the parts of one pipeline rank."""
    estimate = estimate_model_memory(
        config, vocab_size, tied_embeddings=tied, tp_size=tp_size, training=True,
        num_layers=None if parts is None else len(parts.layers),
        embedding_tables=None if parts is None else parts.embedding_tables(tied=tied))
    where = [f"tensor-parallel rank of {tp_size}"] if tp_size > 1 else []
    where += ["pipeline stage"] if parts is not None else []
    check_fits(estimate, device, what=f"training {name}" + (
        f" (per {', '.join(where)})" if where else ""),
        hint="train a smaller preset, split it over more ranks (--tp, --pp) or use a larger "
             "device")


def _json_copy(values: object) -> dict[str, JSONValue]:
    """A JSON-compatible mapping (an HF config) as a checkpoint value, checked by a round trip."""
    decoded: JSONValue = json.loads(json.dumps(values))
    assert isinstance(decoded, dict)
    return decoded


def build_preset_model(preset: Preset, backend: BackendSpecProvider, device: torch.device,
                 pg: ProcessGroups, options: TrainOptions,
                 saved: dict[str, JSONValue] | None, checkpoint: Path | None, *,
                 vocab_size: int, bf16: bool, parts: StageParts | None = None) -> RunModel:
    """The preset's model (or the layer spec a spec file and overrides describe), split over
    `pg` and with the run's sequence parallelism, vocabulary and precision (`bf16`: autocast);
    with `parts` (a pipeline rank's stages) only those parts are allocated, the rest stays on
    the meta device. A resumed run rebuilds the spec its checkpoint stored, not the (possibly
    edited) spec file."""
    config = dataclasses.replace(preset.config(), bf16=bf16)
    if options.recompute_granularity is not None:
        config = dataclasses.replace(config, recompute_granularity=options.recompute_granularity)
    if options.sequence_parallel and pg.tp_size > 1:
        if options.seq_len % pg.tp_size != 0:
            raise ValueError(f"--sequence-parallel needs --seq-len ({options.seq_len}) divisible "
                             f"by --tp ({pg.tp_size})")
        config = dataclasses.replace(config, sequence_parallel=True)
    if pg.ep_size > 1:
        if config.num_moe_experts is None:
            raise ValueError(f"--ep {pg.ep_size} splits the experts of MoE layers, but preset "
                             f"{preset.name!r} has none; pick an MoE preset or drop --ep")
        if config.num_moe_experts % pg.ep_size != 0:
            raise ValueError(f"--ep {pg.ep_size} must divide preset {preset.name!r}'s "
                             f"num_moe_experts={config.num_moe_experts}")
        if config.sequence_parallel:
            raise ValueError("--ep with --sequence-parallel is not supported: the experts' "
                             "gradients would need a tensor-parallel sum; drop one of them")
        config = dataclasses.replace(config, expert_model_parallel_size=pg.ep_size)
    stored = saved.get("layer_spec") if saved is not None else None
    custom: LayerSpecList | None
    if stored is not None:
        custom = stored_layer_spec(stored, allow=options.allow,
                                   where=f"{checkpoint}/{STATE_FILE} layer_spec",
                                   num_layers=config.num_layers)
        source = f"the layer spec stored in {checkpoint}"
    else:
        custom = layer_spec_from_data(preset, backend, spec_file=options.spec,
                                      overrides=options.overrides, allow=options.allow,
                                      config=config)
        source = (f"the layer spec of --spec {options.spec}" if options.spec is not None
                  else "the preset's layer spec with --set overrides")
    spec = custom if custom is not None else preset.layer_spec(backend, config)
    document = to_dict(spec) if custom is not None else None  # fails here, not at the first save
    try:
        with torch.device(device):
            model = GPTModel(config, spec, vocab_size, preset.max_sequence_length, pg=pg,
                             share_embeddings_and_output_weights=preset.tie_embeddings,
                             parts=parts)
    except (TypeError, ValueError) as error:
        if custom is None:
            raise
        raise ValueError(f"{source} does not fit preset {preset.name!r} (a "
                         f"{type(config).__name__}): {error}") from error
    return RunModel(model=model, name=preset.name, preset=preset, hf_config=None,
                     layer_spec=document)


def build_hf_model(source: Path, device: torch.device, pg: ProcessGroups,
                    options: TrainOptions, saved: dict[str, JSONValue] | None, *,
                    tokenizer_vocab_size: int, bf16: bool) -> RunModel:
    """The Hugging Face checkpoint's model (bf16 autocast with `bf16`); a resumed run rebuilds
    its architecture from the config its checkpoint stored (the weights come from the
    checkpoint)."""
    if options.tp != 1 or pg.tp_size != 1:
        raise ValueError(f"--init-from-hf loads the whole model on every process; tensor "
                         f"parallelism (--tp {options.tp}) is not supported with it, use --tp 1")
    if options.ep != 1 or pg.ep_size != 1:
        raise ValueError(f"--init-from-hf loads the whole model on every process; expert "
                         f"parallelism (--ep {options.ep}) is not supported with it, use --ep 1")
    if options.backend != "local":
        raise ValueError(f"--init-from-hf builds the model with the 'local' backend (the layers "
                         f"the Hugging Face weights are converted into); --backend "
                         f"{options.backend!r} is not supported with it")
    stored = saved.get("hf_config") if saved is not None else None
    info = parse_hf_config(stored if isinstance(stored, dict) else read_config(source))
    check_training_memory(info.config, info.vocab_size, tied=info.tie_word_embeddings,
                          device=device, tp_size=1, name=str(source))
    if isinstance(stored, dict):
        model = model_from_hf_config(stored, device=device)
    else:
        model = from_hf(source, dtype=torch.float32, device=device)
    name = f"{source} ({hf_model_info(model).architecture})"
    check_sizes(name, model.vocab_size, model.max_sequence_length, options,
                tokenizer_vocab_size=tokenizer_vocab_size)
    if options.recompute_granularity is not None:  # the layers share the model's config
        model.config.recompute_granularity = options.recompute_granularity
    model.config = dataclasses.replace(model.config, bf16=bf16)
    return RunModel(model=model, name=name, preset=None,
                     hf_config=_json_copy(hf_config_dict(model)), layer_spec=None)
