"""`T5Model`: an encoder-decoder language model (T5, T5 v1.1 and similar) from two layer specs."""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protoformer.config import TransformerConfig
from protoformer.initialization import init_method_normal
from protoformer.models.common import (
    check_sizes,
    check_token_ids,
    output_layer,
    reinitialize_parameters,
)
from protoformer.models.gpt import mixed_precision_context
from protoformer.parallel.cross_entropy import vocab_parallel_cross_entropy
from protoformer.parallel.grads import compute_deferred_weight_grads
from protoformer.parallel.groups import ProcessGroups
from protoformer.parallel.layers import VocabParallelEmbedding
from protoformer.parallel.random import tensor_parallel_rng_fork
from protoformer.spec import apply_module
from protoformer.transformer.block import LayerSpecs, TransformerBlock, per_layer_specs
from protoformer.transformer.inference import InferenceContext
from protoformer.transformer.layer import TransformerLayerSubmodules
from protoformer.transformer.masks import combine_masks
from protoformer.transformer.relative_position import RelativePositionEmbedding
from protoformer.transformer.rope import RotaryEmbedding, rotary_emb_from_config

__all__ = ["T5Model", "T5PositionEmbeddingType"]

T5PositionEmbeddingType = Literal["relative", "rope", "none"]
_POSITION_EMBEDDING_TYPES = ("relative", "rope", "none")

class T5Model(nn.Module):
    """Shared token embedding, an encoder stack, a decoder stack with cross-attention, output layer.

    `forward(encoder_input_ids [b, se], decoder_input_ids [b, sd])` returns logits
    `[b, sd, vocab_size]`, or with `labels [b, sd]` the per-token loss `[b, sd]` (float32, not
    reduced). `encode` and `decode` run the two halves separately (encode once, decode many
    times when generating). `encoder_padding_mask [b, se]` (boolean, True at padding) hides
    encoder padding from the encoder's self-attention and from the decoder's cross-attention.

    The encoder layers come from `transformer_encoder_layer_spec` (bidirectional
    self-attention, e.g. `protoformer.recipes.t5_encoder_layer_spec`), the decoder layers from
    `transformer_decoder_layer_spec` (causal self-attention and a `cross_attention` slot, e.g.
    `t5_decoder_layer_spec`); each is one spec for every layer of its stack or a sequence with one
    per layer. `encoder_config` (default: `config`) may give the encoder its own
    depth; its hidden size must match the decoder's.

    Positions: `"relative"` (T5) adds a learned bucketed bias per head to every layer's
    self-attention scores, one table for the encoder (bidirectional buckets) and one for the
    decoder (causal buckets), shared by the layers of each stack; cross-attention gets none.
    T5 does not scale the scores: build the config with `softmax_scale=1.0` for T5 weights.
    `"rope"` rotates queries and keys of both stacks' self-attention; `"none"` adds nothing.

    `share_embeddings_and_output_weights` ties the output layer to the embedding;
    `scale_decoder_outputs` multiplies the decoder output by `hidden_size ** -0.5` before the
    output layer (original T5, whose output layer is the tied embedding).

    Incremental decoding: `decode(..., inference_context=ctx)` keeps each decoder layer's
    self-attention keys/values and its projected encoder memory in `ctx`; the decoder tokens
    sit at positions `ctx.sequence_len_offset ...` and the context is advanced afterwards.
    Use a fresh (or `reset()`) context for another encoder output.

    Tensor parallelism splits both stacks like `GPTModel`. With `config.sequence_parallel`
    (set alike in `encoder_config`) each rank holds `1 / tp` of both sequences between the
    attention and MLP blocks, `encode` returns this rank's slice of the memory (cross-attention
    gathers it), and both lengths must divide by the tensor-parallel size; incremental decoding
    (one token a step) is then refused, as for `GPTModel`. Finish the gradients with
    `protoformer.parallel.grads.finalize_model_grads` as for any sequence-parallel model.
    """

    def __init__(
        self,
        config: TransformerConfig,
        transformer_encoder_layer_spec: LayerSpecs,
        transformer_decoder_layer_spec: LayerSpecs,
        vocab_size: int,
        max_sequence_length: int,
        *,
        encoder_config: TransformerConfig | None = None,
        pg: ProcessGroups | None = None,
        position_embedding_type: T5PositionEmbeddingType = "relative",
        relative_attention_num_buckets: int = 32,
        relative_attention_max_distance: int = 128,
        share_embeddings_and_output_weights: bool = True,
        scale_decoder_outputs: bool = False,
        parallel_output: bool = True,
    ) -> None:
        super().__init__()
        check_sizes("T5Model", vocab_size=vocab_size, max_sequence_length=max_sequence_length)
        if config.final_logit_softcapping is not None:
            raise ValueError(f"T5Model: config.final_logit_softcapping="
                             f"{config.final_logit_softcapping} is a GPTModel option (Gemma 2); "
                             "the encoder-decoder model does not soft-cap its logits (set None)")
        if position_embedding_type not in _POSITION_EMBEDDING_TYPES:
            raise ValueError(f"T5Model: position_embedding_type={position_embedding_type!r}; "
                             f"expected one of {', '.join(_POSITION_EMBEDDING_TYPES)}")
        encoder_config = encoder_config if encoder_config is not None else config
        for name, stack in (("config", config), ("encoder_config", encoder_config)):
            if stack.multi_latent_attention:
                raise ValueError(f"T5Model: {name} is an MLATransformerConfig; the encoder-decoder "
                                 "model is built from standard attention layers")
        if encoder_config.sequence_parallel != config.sequence_parallel:
            raise ValueError(
                f"T5Model: encoder_config.sequence_parallel={encoder_config.sequence_parallel} "
                f"but config.sequence_parallel={config.sequence_parallel}; the shared embedding "
                "splits both stacks' sequences alike, so set it the same in both")
        if encoder_config.hidden_size != config.hidden_size:
            raise ValueError(
                f"T5Model: encoder_config.hidden_size={encoder_config.hidden_size} differs from "
                f"config.hidden_size={config.hidden_size}; the decoder's cross-attention and the "
                "shared embedding need one hidden size")
        encoder_specs = per_layer_specs(transformer_encoder_layer_spec, encoder_config.num_layers,
                                        owner="T5Model (encoder)")
        decoder_specs = per_layer_specs(transformer_decoder_layer_spec, config.num_layers,
                                        owner="T5Model (decoder)")
        for index, spec in enumerate(decoder_specs):
            if spec.cross_attention is None:
                at = "" if isinstance(transformer_decoder_layer_spec,
                                    TransformerLayerSubmodules) else f"[{index}]"
                raise ValueError(f"T5Model: transformer_decoder_layer_spec{at} has no "
                                 "cross_attention, so the decoder could not read the encoder; "
                                 "use protoformer.recipes.t5_decoder_layer_spec or fill that slot")
        for index, spec in enumerate(encoder_specs):
            if spec.cross_attention is not None:
                at = "" if isinstance(transformer_encoder_layer_spec,
                                    TransformerLayerSubmodules) else f"[{index}]"
                raise ValueError(f"T5Model: transformer_encoder_layer_spec{at} has a "
                                 "cross_attention slot, but the encoder has no memory to attend "
                                 "to; use protoformer.recipes.t5_encoder_layer_spec or set it to "
                                 "None")
        self.config = config
        self.encoder_config = encoder_config
        self.pg = pg if pg is not None else ProcessGroups()
        self.vocab_size = vocab_size
        self.max_sequence_length = max_sequence_length
        self.position_embedding_type: T5PositionEmbeddingType = position_embedding_type
        self.share_embeddings_and_output_weights = share_embeddings_and_output_weights
        self.scale_decoder_outputs = scale_decoder_outputs
        self.parallel_output = parallel_output
        init_method = init_method_normal(config.init_method_std)

        self.embedding = VocabParallelEmbedding(
            vocab_size, config.hidden_size, init_method=init_method, config=config,
            tp_group=self.pg.tp)
        self.encoder_relative_pos_emb: RelativePositionEmbedding | None = None
        self.decoder_relative_pos_emb: RelativePositionEmbedding | None = None
        self.encoder_rotary_pos_emb: RotaryEmbedding | None = None
        self.rotary_pos_emb: RotaryEmbedding | None = None
        if position_embedding_type == "relative":
            buckets, distance = relative_attention_num_buckets, relative_attention_max_distance
            self.encoder_relative_pos_emb = RelativePositionEmbedding(
                encoder_config, bidirectional=True, num_buckets=buckets, max_distance=distance,
                tp_group=self.pg.tp)
            self.decoder_relative_pos_emb = RelativePositionEmbedding(
                config, bidirectional=False, num_buckets=buckets, max_distance=distance,
                tp_group=self.pg.tp)
        elif position_embedding_type == "rope":
            self.encoder_rotary_pos_emb = rotary_emb_from_config(encoder_config)
            self.rotary_pos_emb = rotary_emb_from_config(config)

        self.encoder = TransformerBlock(encoder_config, encoder_specs, pg=self.pg,
                                        post_layer_norm=True)
        self.decoder = TransformerBlock(config, decoder_specs, pg=self.pg, post_layer_norm=True)
        self.output_layer = output_layer(
            config, vocab_size, init_method=init_method, pg=self.pg,
            parallel_output=parallel_output, tied=share_embeddings_and_output_weights)

    # ------------------------------------------------------------------------------ forward

    def forward(
        self,
        encoder_input_ids: Tensor,
        decoder_input_ids: Tensor,
        labels: Tensor | None = None,
        *,
        encoder_padding_mask: Tensor | None = None,
        inference_context: InferenceContext | None = None,
    ) -> Tensor:
        """Logits `[b, sd, vocab_size]`, or the per-token loss `[b, sd]` when `labels` are given."""
        encoder_output = self.encode(encoder_input_ids, encoder_padding_mask=encoder_padding_mask)
        return self.decode(decoder_input_ids, encoder_output, labels,
                           encoder_padding_mask=encoder_padding_mask,
                           inference_context=inference_context)

    def encode(self, encoder_input_ids: Tensor, *,
               encoder_padding_mask: Tensor | None = None) -> Tensor:
        """The encoder's output `[se, b, h]` (after its final norm), the decoder's memory
        (`[se / tp, b, h]`, this rank's slice, under sequence parallelism)."""
        with mixed_precision_context(self.config, encoder_input_ids.device):
            self._check_ids("encoder_input_ids", encoder_input_ids)
            batch, seq_len = encoder_input_ids.shape
            self._check_length("encoder_input_ids", seq_len, 0)
            padding = self._padding_mask(encoder_padding_mask, batch, seq_len)  # [b, 1, 1, se]
            bias = None
            if self.encoder_relative_pos_emb is not None:
                bias = self.encoder_relative_pos_emb(seq_len, seq_len)  # [1, np / tp, se, se]
            rotary = None
            if self.encoder_rotary_pos_emb is not None:
                rotary = self.encoder_rotary_pos_emb(seq_len)
            hidden_states = self._embed("encoder_input_ids", encoder_input_ids)  # [se, b, h]
            return apply_module(self.encoder)(
                hidden_states, combine_masks(padding, bias), rotary_pos_emb=rotary)  # [se, b, h]

    def decode(
        self,
        decoder_input_ids: Tensor,
        encoder_output: Tensor,
        labels: Tensor | None = None,
        *,
        encoder_padding_mask: Tensor | None = None,
        inference_context: InferenceContext | None = None,
    ) -> Tensor:
        """Logits `[b, sd, v]` (or the loss `[b, sd]`) of the decoder reading `encoder_output [se, b, h]`."""
        with mixed_precision_context(self.config, decoder_input_ids.device):
            return self._decode(decoder_input_ids, encoder_output, labels,
                                encoder_padding_mask, inference_context)

    def _decode(
        self,
        decoder_input_ids: Tensor,
        encoder_output: Tensor,
        labels: Tensor | None,
        encoder_padding_mask: Tensor | None,
        inference_context: InferenceContext | None,
    ) -> Tensor:
        self._check_ids("decoder_input_ids", decoder_input_ids)
        batch, seq_len = decoder_input_ids.shape
        if encoder_output.dim() != 3 or encoder_output.shape[1] != batch \
                or encoder_output.shape[2] != self.config.hidden_size:
            raise ValueError(
                f"T5Model: encoder_output has shape {tuple(encoder_output.shape)}; expected "
                f"[se, {batch}, {self.config.hidden_size}] (what encode() returns for the same "
                "batch)")
        offset = 0
        if inference_context is not None and self._splits_sequence():
            raise ValueError("T5Model: incremental decoding (inference_context) feeds one token a "
                             "step, which sequence parallelism cannot split; decode with a model "
                             "built without config.sequence_parallel")
        if inference_context is not None:
            offset = inference_context.sequence_len_offset
            inference_context.check_room(seq_len)
        self._check_length("decoder_input_ids", seq_len, offset)
        if labels is not None:
            self._check_ids("labels", labels)
            if labels.shape != decoder_input_ids.shape:
                raise ValueError(f"T5Model: labels of shape {tuple(labels.shape)} must match "
                                 f"decoder_input_ids of shape {tuple(decoder_input_ids.shape)}")
        memory_len = encoder_output.shape[0]  # this rank's slice under sequence parallelism
        if self._splits_sequence():
            memory_len *= self.pg.tp_size
        padding = self._padding_mask(encoder_padding_mask, batch, memory_len)
        bias = None
        if self.decoder_relative_pos_emb is not None:
            # Queries at [offset, offset + sd), keys at [0, offset + sd): the causal part
            # comes from the self-attention's mask type.
            bias = self.decoder_relative_pos_emb(seq_len, offset + seq_len, offset)  # [1, np / tp, sd, sk]
        rotary = None
        if self.rotary_pos_emb is not None:
            rotary = self.rotary_pos_emb(offset + seq_len)
        hidden_states = self._embed("decoder_input_ids", decoder_input_ids)  # [sd, b, h]
        hidden_states = apply_module(self.decoder)(
            hidden_states, bias, context=encoder_output, context_mask=padding,
            rotary_pos_emb=rotary, inference_context=inference_context)  # [sd, b, h]
        if self.scale_decoder_outputs:
            hidden_states = hidden_states * (self.config.hidden_size ** -0.5)

        weight = self.embedding.weight if self.share_embeddings_and_output_weights else None
        if labels is None and self._splits_sequence():
            # The output layer all-gathers the sequence (dim 0) first: keep [sd, b, h].
            logits, _ = apply_module(self.output_layer)(
                hidden_states, weight=weight, runtime_gather_output=True)  # [sd, b, v]
            result = logits.transpose(0, 1).contiguous()  # [b, sd, v]
        elif labels is None:
            result, _ = apply_module(self.output_layer)(
                hidden_states.transpose(0, 1), weight=weight, runtime_gather_output=True)  # [b, sd, v]
        else:
            logits, _ = apply_module(self.output_layer)(hidden_states, weight=weight)  # [sd, b, v / tp]
            split = self.parallel_output and self.pg.tp_size > 1
            loss = vocab_parallel_cross_entropy(
                logits, labels.transpose(0, 1), self.pg.tp if split else None)  # [sd, b]
            result = loss.transpose(0, 1).contiguous()  # [b, sd]
        if inference_context is not None:
            inference_context.increment(seq_len)
        return result

    def backward_dw(self) -> None:
        """Compute the weight gradients deferred by `config.delay_wgrad_compute`."""
        for child in self.children():
            compute_deferred_weight_grads(child)

    # ------------------------------------------------------------------------------ helpers

    def _splits_sequence(self) -> bool:
        return self.config.sequence_parallel and self.pg.tp_size > 1

    def _embed(self, name: str, ids: Tensor) -> Tensor:
        if self._splits_sequence() and ids.shape[1] % self.pg.tp_size != 0:
            raise ValueError(f"T5Model: {name} has {ids.shape[1]} tokens, which sequence "
                             f"parallelism cannot split over {self.pg.tp_size} ranks; pad it to "
                             f"a multiple of {self.pg.tp_size}")
        embeddings = apply_module(self.embedding)(ids)  # [b, s, h] ([b, s / tp, h] with SP)
        hidden_states = embeddings.transpose(0, 1).contiguous()  # [s, b, h]
        if self.training and self.config.hidden_dropout > 0.0:
            # Sequence-parallel slices differ per rank, so do their masks; replicated
            # activations need the same mask on every rank.
            rng = (tensor_parallel_rng_fork(self.pg.tp) if self._splits_sequence()
                   else contextlib.nullcontext())
            with rng:
                hidden_states = F.dropout(hidden_states, p=self.config.hidden_dropout,
                                          training=True)
        return hidden_states

    def _padding_mask(self, mask: Tensor | None, batch: int, seq_len: int) -> Tensor | None:
        """`[b, se]` (True = padding) -> boolean `[b, 1, 1, se]`, checked."""
        if mask is None:
            return None
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:  # pyright: ignore[reportUnnecessaryIsInstance]  # user input
            raise ValueError(
                "T5Model: encoder_padding_mask must be a boolean tensor [b, se], True at padding; "
                "from a Hugging Face attention_mask (1 = token) use attention_mask == 0")
        if tuple(mask.shape) != (batch, seq_len):
            raise ValueError(f"T5Model: encoder_padding_mask has shape {tuple(mask.shape)}; "
                             f"expected [{batch}, {seq_len}] like the encoder input")
        return mask.view(batch, 1, 1, seq_len)

    def _check_length(self, name: str, seq_len: int, offset: int) -> None:
        if offset + seq_len > self.max_sequence_length:
            where = f" at offset {offset}" if offset else ""
            raise ValueError(
                f"T5Model: {name} has {seq_len} token(s){where}, reaching position "
                f"{offset + seq_len}, beyond max_sequence_length={self.max_sequence_length}; "
                "truncate the input or build the model with a larger max_sequence_length")

    def _check_ids(self, name: str, ids: Tensor) -> None:
        check_token_ids("T5Model", name, ids, self.vocab_size)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter from `config.init_method_std` (as `GPTModel.init_weights`).

        Use it after building on the meta device: `model.to_empty(device=...)` then
        `model.init_weights()`; the rotary tables are recomputed too.
        """
        encoder_layers, decoder_layers = self.encoder_config.num_layers, self.config.num_layers
        reinitialize_parameters(
            self, self.config.init_method_std,
            lambda name: encoder_layers if name.startswith("encoder.") else decoder_layers)
        with torch.device(self.embedding.weight.device):
            if self.rotary_pos_emb is not None:
                self.rotary_pos_emb = rotary_emb_from_config(self.config)
            if self.encoder_rotary_pos_emb is not None:
                self.encoder_rotary_pos_emb = rotary_emb_from_config(self.encoder_config)
