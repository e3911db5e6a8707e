"""Pipeline stages of a `GPTModel`: its layers split into contiguous ranges, one per stage.

Megatron-Core's layout: with `pp` pipeline ranks and `virtual` stages per rank (the
interleaved schedule's model chunks) the model's `num_layers` layers are cut into
`pp * virtual` equal ranges; stage `i` holds range `i` and lives on pipeline rank
`i % pp` (so rank `r` holds stages `r, r + pp, r + 2 pp, ...`). The first stage also holds
the embedding (`pre_process`), the last one the final norm and the output layer
(`post_process`); the loss is computed from the last stage's logits by the schedule's loss
function (`pipeline_loss`).

A stage (`GPTStage`) is a module whose parameter names are the full model's: its layers sit
in an `nn.ModuleDict` keyed by their global index, so stage 1 of a 4-layer model holds
`decoder.layers.2.*` and `decoder.layers.3.*`, and a checkpoint written by one pipeline
layout holds the same keys as one written by another (or by one process). Each rank builds
only its own parts of the model (`stage_parts`, passed as `GPTModel(..., parts=...)`): the
rest is built on the meta device and never allocated, and the parts it builds hold the
single-process model's weights for the same seed (each part has its own random stream).
`split_stages` makes the rank's stages from that model (a model built whole also works: the
parts this rank does not hold are moved to the meta device), plus one module holding all of
this rank's parts (what the optimizer and checkpoints see).

Per-layer specs (dense first layers, then mixture-of-experts layers) are split as they are:
each stage holds its layers whatever their kind. The MoE routers' auxiliary losses reach the
backward through the activations (`MoEAuxLossTracker.attach_to_activations`, set by
`PipelineParallel`), and `GPTStage.update_expert_bias` moves the expert biases of the
routers this rank holds.

Tied input and output embeddings (Megatron-Core's layout): the last stage holds its own copy
of the token embedding, under the embedding's name (`embedding.weight`), built from the
embedding's random stream so it starts equal to the first stage's; the output layer reads
it. After each backward the two copies' gradients are summed over the embedding group (the
first and last pipeline ranks: `ProcessGroups.embd`), so both take the same optimizer step;
the global gradient norm counts the copy once. A checkpoint holds one `embedding.weight`.
When the first and last stages sit on one rank (`--pp 1` with a schedule) the output layer
reads the embedding itself.

Refused (ValueError, one line each): layers not divisible by `pp * virtual`, deferred weight
gradients.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protoformer.config import TransformerConfig
from protoformer.models.gpt import GPTModel, expert_bias_groups, mixed_precision_context
from protoformer.models.stage_parts import StageParts
from protoformer.parallel.cross_entropy import vocab_parallel_cross_entropy
from protoformer.parallel.groups import ProcessGroups
from protoformer.parallel.layers import ColumnParallelLinear, VocabParallelEmbedding
from protoformer.parallel.parameters import (
    named_parallel_metadata,
    parallel_metadata,
    restore_parallel_metadata,
    set_parallel_metadata,
)
from protoformer.parallel.random import tensor_parallel_rng_fork
from protoformer.spec import apply_module
from protoformer.transformer.layer import TransformerLayer
from protoformer.transformer.moe.aux_loss import update_expert_biases
from protoformer.transformer.norm import LayerNormInterface
from protoformer.transformer.rope import RotaryEmbedding

__all__ = [
    "GPTStage",
    "StageSplit",
    "check_pipeline_supported",
    "mark_shared_embedding_copy",
    "pipeline_loss",
    "rank_stage_indices",
    "split_stages",
    "stage_layer_ranges",
    "stage_parts",
]


def stage_layer_ranges(num_layers: int, pp: int, virtual: int = 1) -> list[range]:
    """The layers (0-based global indices) of each of the `pp * virtual` stages, in order."""
    stages = pp * virtual
    if pp < 1 or virtual < 1:
        raise ValueError(f"pipeline size {pp} and virtual stages {virtual} must be >= 1")
    if num_layers % stages != 0:
        what = f"--pp {pp}" + (f" x --virtual-pipeline-model-parallel-size {virtual}"
                               if virtual > 1 else "")
        raise ValueError(f"the model's {num_layers} layers cannot be split evenly into {stages} "
                         f"pipeline stages ({what}); choose sizes whose product divides "
                         f"{num_layers}")
    per_stage = num_layers // stages
    return [range(i * per_stage, (i + 1) * per_stage) for i in range(stages)]


def rank_stage_indices(pp_rank: int, pp: int, virtual: int = 1) -> list[int]:
    """The stages pipeline rank `pp_rank` holds: `pp_rank + pp * v` for each virtual stage."""
    return [pp_rank + pp * v for v in range(virtual)]


def stage_parts(num_layers: int, pp_rank: int, pp: int, virtual: int = 1) -> StageParts:
    """The parts of the model pipeline rank `pp_rank` builds (`GPTModel(..., parts=...)`):
    the layers of its stages, the embedding if it holds the first stage, the final norm and
    output layer if it holds the last."""
    ranges = stage_layer_ranges(num_layers, pp, virtual)
    indices = rank_stage_indices(pp_rank, pp, virtual)
    return StageParts(layers=frozenset(layer for i in indices for layer in ranges[i]),
                      pre_process=0 in indices, post_process=len(ranges) - 1 in indices)


def check_pipeline_supported(model: GPTModel, pp: int, virtual: int = 1) -> None:
    """ValueError (one line) for a model `pp` x `virtual` pipeline stages cannot hold."""
    config = model.config
    stage_layer_ranges(config.num_layers, pp, virtual)
    if config.delay_wgrad_compute:
        raise ValueError("--pp cannot be combined with delay_wgrad_compute (the schedule runs "
                         "the backward passes); turn it off")


class _StageDecoder(nn.Module):
    """A stage's layers, keyed by their global index, and the final norm on the last stage."""

    def __init__(self, layers: dict[str, TransformerLayer],
                 final_layernorm: LayerNormInterface | None) -> None:
        super().__init__()
        self.layers = nn.ModuleDict(layers)
        self.final_layernorm = final_layernorm


class GPTStage(nn.Module):
    """Layers `layers` of `model` (and its embedding / output layer for the first / last
    stage), sharing `model`'s modules and keeping their fully-qualified names.

    `forward` takes the token ids `[b, s]` on the first stage, the hidden states `[s, b, h]`
    (`[s / tp, b, h]` under sequence parallelism) elsewhere; it returns the hidden states, or
    on the last stage the logits `[s, b, v / tp]` (`[s, b, v]` when the output layer gathers
    them) that `pipeline_loss` turns into the loss.
    """

    def __init__(self, model: GPTModel, layers: Sequence[int], *, pre_process: bool,
                 post_process: bool, first_stage_local: bool = False) -> None:
        super().__init__()
        self.config: TransformerConfig = model.config
        self.pg: ProcessGroups = model.pg
        self.pre_process = pre_process
        self.post_process = post_process
        # With tied embeddings the last stage's output layer reads the embedding's weight: it
        # holds the embedding (this rank's copy) unless another stage of this rank, the first,
        # holds it already (a parameter must belong to one stage: the schedule scales each
        # stage's gradients once). The tuple keeps it out of this module's parameters.
        tied = model.share_embeddings_and_output_weights and post_process
        holds_embedding = pre_process or (tied and not first_stage_local)
        self.embedding: VocabParallelEmbedding | None = (
            model.embedding if holds_embedding else None)
        self._tied_embedding: tuple[VocabParallelEmbedding, ...] = (
            (model.embedding,) if tied else ())
        self.position_embeddings: nn.Embedding | None = (
            model.position_embeddings if pre_process else None)
        self.rotary_pos_emb: RotaryEmbedding | None = model.rotary_pos_emb
        blocks: dict[str, TransformerLayer] = {}
        for index in layers:
            layer = model.decoder.layers[index]
            assert isinstance(layer, TransformerLayer)
            blocks[str(index)] = layer
        self.decoder = _StageDecoder(
            blocks, model.decoder.final_layernorm if post_process else None)
        self.output_layer: ColumnParallelLinear | None = (
            model.output_layer if post_process else None)

    def update_expert_bias(self) -> None:
        """`GPTModel.update_expert_bias` for the routers of this stage's layers (once per
        optimizer step)."""
        update_expert_biases(self.decoder, expert_bias_groups(self.config, self.pg))

    def forward(self, inputs: Tensor) -> Tensor:
        """Token ids `[b, s]` (first stage) or hidden states `[s, b, h]` -> hidden states or
        logits (last stage)."""
        with mixed_precision_context(self.config, inputs.device):
            hidden_states = self._embed(inputs) if self.pre_process else inputs
            sequence_length = hidden_states.shape[0]  # [s, b, h]
            if self.config.sequence_parallel and self.pg.tp_size > 1:
                sequence_length *= self.pg.tp_size  # each rank holds a slice of the sequence
            rotary = (self.rotary_pos_emb(sequence_length) if self.rotary_pos_emb is not None
                      else None)  # [s, 1, 1, rot_dim]
            for layer in self.decoder.layers.values():
                assert isinstance(layer, TransformerLayer)
                hidden_states = apply_module(layer)(hidden_states, None,
                                                    rotary_pos_emb=rotary)  # [s, b, h]
            if not self.post_process:
                return hidden_states
            norm = self.decoder.final_layernorm
            if norm is not None:
                hidden_states = apply_module(norm)(hidden_states)
            assert self.output_layer is not None
            weight = self._tied_embedding[0].weight if self._tied_embedding else None
            logits, _ = apply_module(self.output_layer)(hidden_states,
                                                        weight=weight)  # [s, b, v / tp]
            cap = self.config.final_logit_softcapping
            if cap is not None:  # Gemma 2: elementwise, so on any vocabulary split
                logits = torch.tanh(logits / cap) * cap
            return logits

    def _embed(self, input_ids: Tensor) -> Tensor:
        """The first stage's input: token (and learned position) embeddings `[s, b, h]`, as
        `GPTModel` computes them in training."""
        assert self.embedding is not None
        embeddings = apply_module(self.embedding)(input_ids)  # [b, s, h] ([b, s / tp, h] with SP)
        if self.config.embedding_multiplier != 1.0:
            embeddings = embeddings * torch.tensor(self.config.embedding_multiplier,
                                                   dtype=embeddings.dtype)
        if self.position_embeddings is not None:
            local_len = embeddings.shape[1]
            start = self.pg.tp_rank * local_len if self.embedding.reduce_scatter_embeddings else 0
            positions = torch.arange(start, start + local_len, device=input_ids.device)  # [s]
            embeddings = embeddings + self.position_embeddings(positions)
        hidden_states = embeddings.transpose(0, 1).contiguous()  # [s, b, h]
        if self.training and self.config.hidden_dropout > 0.0:
            rng = (tensor_parallel_rng_fork(self.pg.tp)
                   if self.embedding.reduce_scatter_embeddings else contextlib.nullcontext())
            with rng:
                hidden_states = F.dropout(hidden_states, p=self.config.hidden_dropout,
                                          training=True)
        return hidden_states


def pipeline_loss(model: GPTModel, logits: Tensor, labels: Tensor) -> Tensor:
    """The mean cross-entropy `[]` (float32) of the last stage's logits `[s, b, v / tp]` for
    `labels` `[b, s]`, as `GPTModel(..., labels, loss_reduction="mean")` computes it."""
    split = model.parallel_output and model.pg.tp_size > 1
    with mixed_precision_context(model.config, logits.device):
        loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1),
                                            model.pg.tp if split else None)  # [s, b]
    return loss.float().mean()


@dataclass
class StageSplit:
    """A rank's pipeline stages and the one module holding all of its parts."""

    stages: list[GPTStage]  # in schedule order (virtual stage 0 first)
    indices: list[int]  # each stage's global stage index
    num_stages: int  # over all ranks: pp * virtual
    module: GPTStage  # this rank's parameters under their full-model names


def split_stages(model: GPTModel, pg: ProcessGroups, virtual: int = 1) -> StageSplit:
    """This pipeline rank's stages of `model`; the rest of `model` is moved to the meta device."""
    pp = pg.pp_size
    check_pipeline_supported(model, pp, virtual)
    ranges = stage_layer_ranges(model.config.num_layers, pp, virtual)
    last = len(ranges) - 1
    indices = rank_stage_indices(pg.pp_rank, pp, virtual)
    first_local = 0 in indices
    stages = [GPTStage(model, ranges[i], pre_process=i == 0, post_process=i == last,
                       first_stage_local=first_local and i != 0) for i in indices]
    owned = sorted(layer for i in indices for layer in ranges[i])
    module = GPTStage(model, owned, pre_process=first_local, post_process=last in indices)
    tied = model.share_embeddings_and_output_weights
    if tied and module.post_process and not module.pre_process:
        mark_shared_embedding_copy(model.embedding.weight)
    records = named_parallel_metadata(model)  # the meta copies keep their split records
    _release_others(model, set(owned), pre_process=module.pre_process,
                    post_process=module.post_process, tied=tied)
    restore_parallel_metadata(model, records)
    return StageSplit(stages=stages, indices=indices, num_stages=len(ranges), module=module)


def mark_shared_embedding_copy(weight: Tensor) -> None:
    """Record on the last stage's copy of a tied embedding weight that its gradient is summed
    with the first stage's and that the global gradient norm counts it there."""
    set_parallel_metadata(weight, dataclasses.replace(parallel_metadata(weight),
                                                      shared_embedding_copy=True))


def _release_others(model: GPTModel, owned: set[int], *, pre_process: bool,
                    post_process: bool, tied: bool) -> None:
    """Move what this rank does not hold to the meta device (shapes kept, memory freed;
    nothing to do for the parts a stage-only build left there)."""
    released: list[object] = [
        layer for index, layer in enumerate(model.decoder.layers) if index not in owned]
    if not pre_process:
        released.append(model.position_embeddings)
        if not (tied and post_process):  # the last stage's copy of a tied embedding stays
            released.append(model.embedding)
    if not post_process:
        released += [model.decoder.final_layernorm, model.output_layer]
    for module in released:
        if isinstance(module, nn.Module):
            module.to(device="meta")
