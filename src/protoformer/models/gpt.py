"""`GPTModel`: a decoder-only language model (GPT, Llama, DeepSeek-style MLA) from a layer spec."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protoformer.config import TransformerConfig
from protoformer.initialization import draw_init_seed, fork_init_rng
from protoformer.kernels.linear_cross_entropy import fused_linear_cross_entropy
from protoformer.memory import check_fits, estimate_model_memory
from protoformer.models.common import (
    check_sizes,
    check_token_ids,
    output_layer,
    reinitialize_parameters,
)
from protoformer.models.stage_parts import StageParts
from protoformer.parallel.cross_entropy import vocab_parallel_cross_entropy
from protoformer.parallel.grads import compute_deferred_weight_grads
from protoformer.parallel.groups import ProcessGroup, ProcessGroups
from protoformer.parallel.layers import VocabParallelEmbedding
from protoformer.parallel.parameters import mark_sequence_parallel
from protoformer.parallel.random import tensor_parallel_rng_fork
from protoformer.spec import apply_module
from protoformer.transformer.block import LayerSpecs, TransformerBlock, built_on
from protoformer.transformer.inference import InferenceContext
from protoformer.transformer.mlp import init_method_normal
from protoformer.transformer.moe.aux_loss import (
    MoEAuxLossTracker,
    bind_aux_loss_tracker,
    update_expert_biases,
)
from protoformer.transformer.rope import RotaryEmbedding, rotary_emb_from_config

__all__ = ["GPTModel", "PositionEmbeddingType", "expert_bias_groups", "mixed_precision_context"]

PositionEmbeddingType = Literal["rope", "learned_absolute", "none"]
_POSITION_EMBEDDING_TYPES = ("rope", "learned_absolute", "none")

class GPTModel(nn.Module):
    """Token embedding, `config.num_layers` layers of `layer_spec`, final norm, output layer.

    `layer_spec` is one `TransformerLayerSubmodules` for every layer or a sequence with one
    per layer (see `TransformerBlock`).

    `forward(input_ids [b, s])` returns logits `[b, s, vocab_size]` (gathered to the full
    vocabulary), or with `labels [b, s]` the per-token loss `[b, s]` (float32, not reduced;
    mask and average it yourself). The loss is computed on vocabulary-split logits, so under
    tensor parallelism the full logits are never gathered.

    Positions: `position_embedding_type="rope"` builds one rotary table per forward from the
    config and every attention layer rotates with it (multi-latent attention ignores it and
    uses its own); `"learned_absolute"` adds a learned `[max_sequence_length, h]` table to the
    token embeddings; `"none"` adds nothing. Inputs longer than `max_sequence_length` are
    rejected.

    Incremental decoding: pass an `InferenceContext`; the tokens of `input_ids` sit at
    positions `sequence_len_offset ...`, and after the forward the context is advanced by
    `s` (`inference_context.increment(s)`).

    `share_embeddings_and_output_weights` ties the output layer to the embedding weight.
    `config.final_logit_softcapping = c` soft-caps the logits, `c * tanh(logits / c)`, before
    they are returned or enter the loss (Gemma 2).
    `parts` (a `StageParts`) builds only some parts, the others on the meta device: what a
    pipeline rank holds (`protoformer.parallel.pipeline.stage_parts`); their weights equal the
    whole model's for the same seed. Each part (the embedding, each layer, the output layer)
    is initialised from its own random stream (`protoformer.initialization.fork_init_rng`).
    `parallel_output=True` keeps the output layer's logits split over tensor-parallel ranks
    (they are gathered only when logits are returned); `False` gathers them in the layer.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_spec: LayerSpecs,
        vocab_size: int,
        max_sequence_length: int,
        *,
        pg: ProcessGroups | None = None,
        share_embeddings_and_output_weights: bool = False,
        position_embedding_type: PositionEmbeddingType = "rope",
        parallel_output: bool = True,
        parts: StageParts | None = None,
    ) -> None:
        super().__init__()
        check_sizes("GPTModel", vocab_size=vocab_size, max_sequence_length=max_sequence_length)
        check_fits(estimate_model_memory(
            config, vocab_size, tied_embeddings=share_embeddings_and_output_weights,
            max_sequence_length=max_sequence_length,
            learned_positions=position_embedding_type == "learned_absolute",
            tp_size=pg.tp_size if pg is not None else 1,
            num_layers=None if parts is None else len(parts.layers),
            embedding_tables=None if parts is None else parts.embedding_tables(
                tied=share_embeddings_and_output_weights)), None, what="GPTModel")
        if position_embedding_type not in _POSITION_EMBEDDING_TYPES:
            raise ValueError(f"GPTModel: position_embedding_type={position_embedding_type!r}; "
                             f"expected one of {', '.join(_POSITION_EMBEDDING_TYPES)}")
        self.config = config
        self.pg = pg if pg is not None else ProcessGroups()
        self.vocab_size = vocab_size
        self.max_sequence_length = max_sequence_length
        self.share_embeddings_and_output_weights = share_embeddings_and_output_weights
        self.position_embedding_type: PositionEmbeddingType = position_embedding_type
        self.parallel_output = parallel_output
        init_method = init_method_normal(config.init_method_std)
        # Each part from its own stream (see `protoformer.initialization`): the weights of a
        # part do not depend on which other parts this process builds.
        init_seed = draw_init_seed()
        tied = share_embeddings_and_output_weights
        pre = parts is None or parts.pre_process
        post = parts is None or parts.post_process

        with (fork_init_rng(init_seed, "embedding"),
              built_on(parts is None or parts.builds_embedding(tied=tied))):
            self.embedding = VocabParallelEmbedding(
                vocab_size, config.hidden_size, init_method=init_method, config=config,
                tp_group=self.pg.tp)
        self.position_embeddings: nn.Embedding | None = None
        if position_embedding_type == "learned_absolute":
            with fork_init_rng(init_seed, "position_embeddings"), built_on(pre):
                self.position_embeddings = nn.Embedding(
                    max_sequence_length, config.hidden_size, dtype=config.params_dtype)
                if config.perform_initialization:
                    init_method(self.position_embeddings.weight)
            # Under sequence parallelism each rank adds the rows of its own slice of the
            # sequence: its gradient is partial and summed over the tensor-parallel group.
            mark_sequence_parallel([self.position_embeddings.weight], config.sequence_parallel)
        # Multi-latent attention applies its own (decoupled, possibly YaRN) rotary embedding.
        self.rotary_pos_emb: RotaryEmbedding | None = None
        if position_embedding_type == "rope" and not config.multi_latent_attention:
            self.rotary_pos_emb = rotary_emb_from_config(config)

        with fork_init_rng(init_seed, "decoder"):
            self.decoder = TransformerBlock(config, layer_spec, pg=self.pg, post_layer_norm=True,
                                            built_layers=None if parts is None else parts.layers)
        with fork_init_rng(init_seed, "output_layer"), built_on(post):
            self.output_layer = output_layer(
                config, vocab_size, init_method=init_method, pg=self.pg,
                parallel_output=parallel_output, tied=tied)
        # The MoE routers' auxiliary losses of the latest forward (the training step adds
        # `moe_aux_losses.total()` to the loss); empty for a dense model.
        self.moe_aux_losses = MoEAuxLossTracker()
        bind_aux_loss_tracker(self.decoder, self.moe_aux_losses)

    def update_expert_bias(self) -> None:
        """Move every router's aux-loss-free expert bias by its token counts since the last
        call, summed over the ranks that route different tokens (data-parallel, and the
        tensor-parallel group under sequence parallelism); call once per optimizer step."""
        update_expert_biases(self.decoder, expert_bias_groups(self.config, self.pg))

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        *,
        attention_mask: Tensor | None = None,
        inference_context: InferenceContext | None = None,
        loss_reduction: Literal["none", "mean"] = "none",
    ) -> Tensor:
        """Logits `[b, s, vocab_size]`, or the per-token loss `[b, s]` when `labels` are given.

        `loss_reduction="mean"` returns the mean of those losses `[]` instead (what a training
        step needs; it leaves the fused loss free to take its gradients in forward).
        A mixture-of-experts model's routers record their auxiliary losses of this forward (in
        training) in `self.moe_aux_losses`, to be added to the loss.

        With `config.bf16` and float32 parameters the model runs under bfloat16 autocast
        (`mixed_precision_context`); the norms, softmax and loss stay float32.
        """
        self.moe_aux_losses.clear()
        with mixed_precision_context(self.config, input_ids.device):
            return self._forward(input_ids, labels, attention_mask=attention_mask,
                                 inference_context=inference_context,
                                 loss_reduction=loss_reduction)

    def _forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None,
        *,
        attention_mask: Tensor | None,
        inference_context: InferenceContext | None,
        loss_reduction: Literal["none", "mean"] = "none",
    ) -> Tensor:
        self._check_ids("input_ids", input_ids)
        if loss_reduction not in ("none", "mean"):
            raise ValueError(f"GPTModel: loss_reduction={loss_reduction!r}; expected 'none' "
                             "(per-token losses) or 'mean'")
        seq_len = input_ids.shape[1]
        offset = 0
        # Static-shape decoding: each row at its own device-held positions (see InferenceContext).
        static_positions = inference_context.positions if inference_context is not None else None
        if inference_context is not None and static_positions is not None:
            self._check_static_decoding(inference_context, input_ids, labels)
            inference_context.start_step()
        elif inference_context is not None:
            offset = inference_context.sequence_len_offset
            inference_context.check_room(seq_len)
        if offset + seq_len > self.max_sequence_length:
            where = f" at offset {offset}" if offset else ""
            raise ValueError(
                f"GPTModel: a sequence of {seq_len} token(s){where} reaches position "
                f"{offset + seq_len}, beyond max_sequence_length={self.max_sequence_length}; "
                "truncate the input or build the model with a larger max_sequence_length")
        if labels is not None:
            self._check_ids("labels", labels)
            if labels.shape != input_ids.shape:
                raise ValueError(f"GPTModel: labels of shape {tuple(labels.shape)} must match "
                                 f"input_ids of shape {tuple(input_ids.shape)} ([b, s])")

        embeddings = apply_module(self.embedding)(input_ids)  # [b, s, h] ([b, s / tp, h] with SP)
        if self.config.embedding_multiplier != 1.0:
            # In the embeddings' dtype, as Gemma's `normalizer`.
            embeddings = embeddings * torch.tensor(self.config.embedding_multiplier,
                                                   dtype=embeddings.dtype)
        if self.position_embeddings is not None:
            local_len = embeddings.shape[1]  # this rank's slice under sequence parallelism
            start = offset
            if self.embedding.reduce_scatter_embeddings:
                start += self.pg.tp_rank * local_len
            positions = torch.arange(start, start + local_len, device=input_ids.device)  # [s]
            if inference_context is not None and static_positions is not None:
                positions = inference_context.decode_positions(seq_len).T  # [b, s]
            embeddings = embeddings + self.position_embeddings(positions)  # [b, s, h]
        hidden_states = embeddings.transpose(0, 1).contiguous()  # [s, b, h]
        if self.training and self.config.hidden_dropout > 0.0:
            # Sequence-parallel slices differ per rank, so do their masks; replicated
            # activations (no sequence parallelism) need the same mask on every rank.
            rng = (tensor_parallel_rng_fork(self.pg.tp) if self.embedding.reduce_scatter_embeddings
                   else contextlib.nullcontext())
            with rng:
                hidden_states = F.dropout(hidden_states, p=self.config.hidden_dropout,
                                          training=True)
        rotary_pos_emb = None
        if self.rotary_pos_emb is not None:
            table_len = offset + seq_len if inference_context is None or static_positions is None \
                else inference_context.max_sequence_length
            rotary_pos_emb = self.rotary_pos_emb(table_len)  # [offset + s, 1, 1, rot_dim]

        hidden_states = apply_module(self.decoder)(
            hidden_states, attention_mask, rotary_pos_emb=rotary_pos_emb,
            inference_context=inference_context)  # [s, b, h]

        weight = self.embedding.weight if self.share_embeddings_and_output_weights else None
        if labels is None:
            if self.config.sequence_parallel and self.pg.tp_size > 1:
                # The output layer all-gathers the sequence (dim 0) first: keep [s, b, h].
                logits, _ = apply_module(self.output_layer)(
                    hidden_states, weight=weight, runtime_gather_output=True)  # [s, b, v]
                result = _softcap(logits, self.config.final_logit_softcapping)
                result = result.transpose(0, 1).contiguous()  # [b, s, v]
            else:
                # A linear layer does not care about the leading dims: transpose the small
                # hidden states rather than copy the vocabulary-wide logits afterwards.
                result, _ = apply_module(self.output_layer)(
                    hidden_states.transpose(0, 1), weight=weight,
                    runtime_gather_output=True)  # [b, s, v]
                result = _softcap(result, self.config.final_logit_softcapping)
        elif self._fuses_output_and_loss():
            # The output layer and the loss in one chunked step: never the full [s, b, v] logits.
            output_weight = weight if weight is not None else self.output_layer.weight
            assert output_weight is not None  # allocated unless shared with the embedding
            loss = fused_linear_cross_entropy(
                hidden_states, output_weight, labels.transpose(0, 1),
                reduction=loss_reduction)  # [s, b], or [] for the mean
            result = loss if loss_reduction == "mean" else loss.transpose(0, 1).contiguous()  # [b, s]
        else:
            logits, _ = apply_module(self.output_layer)(hidden_states, weight=weight)  # [s, b, v / tp] or [s, b, v]
            logits = _softcap(logits, self.config.final_logit_softcapping)  # elementwise: any split
            split = self.parallel_output and self.pg.tp_size > 1
            loss = vocab_parallel_cross_entropy(
                logits, labels.transpose(0, 1), self.pg.tp if split else None)  # [s, b]
            result = loss.mean() if loss_reduction == "mean" \
                else loss.transpose(0, 1).contiguous()  # [b, s]
        if static_positions is not None:
            static_positions.add_(seq_len)  # in place: a captured graph advances it on replay
        elif inference_context is not None:
            inference_context.increment(seq_len)
        return result

    def backward_dw(self) -> None:
        """Compute the weight gradients deferred by `config.delay_wgrad_compute`.

        Call it after `loss.backward()` (and before the optimizer step): with deferred weight
        gradients the backward pass computes only the input gradients, so the weight-gradient
        matmuls can be scheduled later (e.g. overlapped with communication).
        """
        for child in self.children():
            compute_deferred_weight_grads(child)

    def _fuses_output_and_loss(self) -> bool:
        """`config.cross_entropy_loss_fusion` applies: one rank holds the whole vocabulary
        (no sequence-parallel gather), the output weight's gradient is not deferred, and the
        logits are not soft-capped (the fused loss never forms them)."""
        return (self.config.cross_entropy_loss_fusion and self.pg.tp_size == 1
                and self.config.final_logit_softcapping is None
                and not self.config.delay_wgrad_compute and self.output_layer.bias is None)

    def _check_static_decoding(self, context: InferenceContext, input_ids: Tensor,
                               labels: Tensor | None) -> None:
        positions = context.positions
        assert positions is not None
        if labels is not None or self.pg.tp_size != 1 or self.config.sequence_parallel:
            raise ValueError("GPTModel: static-shape decoding (InferenceContext.positions) runs "
                             "without labels on one tensor-parallel rank")
        if positions.shape != (input_ids.shape[0],):
            raise ValueError(f"GPTModel: InferenceContext.positions has shape "
                             f"{tuple(positions.shape)}; expected one position per row "
                             f"({input_ids.shape[0]},)")
        if context.max_sequence_length > self.max_sequence_length:
            raise ValueError(f"GPTModel: the InferenceContext holds {context.max_sequence_length} "
                             f"positions, more than max_sequence_length={self.max_sequence_length}")

    def _check_ids(self, name: str, ids: Tensor) -> None:
        check_token_ids("GPTModel", name, ids, self.vocab_size)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter from `config.init_method_std`, and the rotary tables.

        Weights of linears and embeddings: normal(0, std), the linears writing into the
        residual stream (`linear_proj`, `linear_fc2`) normal(0, std / sqrt(2 * num_layers));
        biases 0; norm scales (other 1-D weights) 1. The rotary frequency tables
        (non-persistent buffers) are recomputed from the config, and any other module with a
        `reset_parameters` method runs it first. Use it after building on the meta device:
        `model.to_empty(device=...)` then `model.init_weights()`.
        """
        num_layers = self.config.num_layers
        reinitialize_parameters(self, self.config.init_method_std, lambda _name: num_layers)
        self._recompute_rotary_tables()

    def _recompute_rotary_tables(self) -> None:
        """Refill the model's rotary `inv_freq` buffer, which `to_empty` leaves uninitialised
        (attention modules with their own tables refill them in `reset_parameters`)."""
        device = self.embedding.weight.device
        if self.rotary_pos_emb is not None:
            with torch.device(device):
                self.rotary_pos_emb = rotary_emb_from_config(self.config)


def _softcap(logits: Tensor, cap: float | None) -> Tensor:
    """`cap * tanh(logits / cap)` (Gemma 2's final-logit soft-capping), or `logits` for None."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def expert_bias_groups(config: TransformerConfig, pg: ProcessGroups) -> list[ProcessGroup | None]:
    """The groups over which the routers' token counts are summed before an expert-bias update:
    the ranks that route different tokens (data-parallel, and tensor-parallel under sequence
    parallelism)."""
    groups = [pg.dp]
    if config.sequence_parallel:
        groups.append(pg.tp)
    return groups


def mixed_precision_context(config: TransformerConfig,
                            device: torch.device) -> AbstractContextManager[object]:
    """bfloat16 autocast on `device` when `config.bf16` and the weights are not bf16 already.

    Mixed precision in the usual sense: float32 master weights and gradients, matmuls in
    bfloat16. The norms and the loss compute in float32 by construction and SDPA accumulates
    its softmax in float32. With `params_dtype=torch.bfloat16` (pure bf16) nothing is needed.
    """
    if config.bf16 and config.params_dtype != torch.bfloat16 and device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
