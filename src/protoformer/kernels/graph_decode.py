"""Greedy decoding whose per-token step is one CUDA graph replay.

A decode step of a small model is a few hundred tiny kernels; launched one by one from
Python, the GPU waits on the host. Capturing the step in a CUDA graph replays all of them
with one launch, but a graph fixes every shape and every address, while the eager step
slices the KV cache to the current length and writes it at a Python-int offset. The step
here is therefore written with static shapes:

- the write position is a device tensor `position` `[1]`; keys and values are written with
  `index_copy_` at that position into caches of the full `max_sequence_length`;
- attention runs over the whole cache with a boolean mask blocking positions after
  `position` (the same softmax: blocked scores contribute exactly zero);
- the rotary angles are one row of a table built once for every position (`index_select`).

The prompt is prefilled by the ordinary eager forward (`GPTModel` with an
`InferenceContext`), which allocates the caches at their full size; the graph then reads and
writes those same tensors. Each layer's own submodules (norms, the QKV projection, core
attention, projections, MLP) run inside the step, so any backend's builders are captured.

Supported: `GPTModel`s whose layers are `TransformerLayer`s with `SelfAttention` and no
cross-attention, on one tensor-parallel rank. Without CUDA (or with `use_cuda_graph=False`)
the same static step runs eagerly, which is how CPU tests check it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from protoformer.kernels.rope import fused_apply_rotary_pos_emb
from protoformer.models.gpt import GPTModel, mixed_precision_context
from protoformer.spec import apply_module
from protoformer.transformer.attention import SelfAttention
from protoformer.transformer.enums import AttnMaskType
from protoformer.transformer.inference import InferenceContext
from protoformer.transformer.layer import TransformerLayer, bias_dropout_add
from protoformer.transformer.rope import apply_rotary_pos_emb

__all__ = ["GraphDecoder", "greedy_generate"]


def _check_prompt(model: GPTModel, prompt_ids: Tensor, max_new_tokens: int) -> None:
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1:
        raise ValueError(f"prompt_ids must be [batch, prompt_length] with at least one token, "
                         f"got shape {tuple(prompt_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    total = prompt_ids.shape[1] + max_new_tokens
    if total > model.max_sequence_length:
        raise ValueError(f"prompt of {prompt_ids.shape[1]} + {max_new_tokens} new tokens "
                         f"exceeds the model's max_sequence_length={model.max_sequence_length}")


@torch.inference_mode()
def greedy_generate(model: GPTModel, prompt_ids: Tensor, max_new_tokens: int) -> Tensor:
    """Eager batched greedy decoding with the KV cache: `[b, p]` prompts -> `[b, n]` new tokens.

    All prompts have the same length (no padding). This is the reference `GraphDecoder`
    must reproduce, and the eager baseline of the decode benchmark.
    """
    _check_prompt(model, prompt_ids, max_new_tokens)
    batch, prompt_len = prompt_ids.shape
    context = InferenceContext(max_batch_size=batch,
                               max_sequence_length=prompt_len + max_new_tokens)
    forward = apply_module(model)
    was_training = model.training
    model.eval()
    try:
        logits = forward(prompt_ids, inference_context=context)  # [b, p, v]
        token = logits[:, -1].argmax(dim=-1)  # [b]
        generated = [token]
        for _ in range(max_new_tokens - 1):
            logits = forward(token[:, None], inference_context=context)  # [b, 1, v]
            token = logits[:, -1].argmax(dim=-1)  # [b]
            generated.append(token)
    finally:
        model.train(was_training)
    return torch.stack(generated, dim=1)  # [b, n]


class GraphDecoder:
    """Greedy decoding of `batch_size` equal-length prompts, one CUDA graph replay per token.

    Build once per (model, batch size, maximum length) and call `generate` as often as you
    like: the graph is captured on the first call and replayed afterwards (the caches and the
    step's buffers stay allocated). Greedy outputs equal `greedy_generate`'s up to the
    rounding of a masked full-length attention against a sliced one.
    """

    def __init__(self, model: GPTModel, *, batch_size: int, max_sequence_length: int,
                 use_cuda_graph: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"GraphDecoder(batch_size={batch_size}): must be >= 1")
        if not 1 <= max_sequence_length <= model.max_sequence_length:
            raise ValueError(f"GraphDecoder(max_sequence_length={max_sequence_length}): must be in "
                             f"[1, {model.max_sequence_length}] (the model's maximum)")
        if model.pg.tp_size != 1:
            raise ValueError("GraphDecoder runs on one tensor-parallel rank; the model has "
                             f"tp_size={model.pg.tp_size}")
        self.layers: list[tuple[TransformerLayer, SelfAttention]] = []
        for layer in model.decoder.layers:
            if not isinstance(layer, TransformerLayer) or layer.cross_attention is not None \
                    or not isinstance(layer.self_attention, SelfAttention):
                raise TypeError(f"GraphDecoder supports TransformerLayer with SelfAttention and no "
                                f"cross-attention; got {type(layer).__qualname__} holding "
                                f"{type(getattr(layer, 'self_attention', None)).__qualname__}")
            self.layers.append((layer, layer.self_attention))
        self.model = model
        self.batch_size = batch_size
        self.max_sequence_length = max_sequence_length
        device = model.embedding.weight.device
        self.device = device
        self.use_cuda_graph = use_cuda_graph and device.type == "cuda"
        self.context = InferenceContext(max_batch_size=batch_size,
                                        max_sequence_length=max_sequence_length)
        self.tokens = torch.zeros((batch_size, 1), dtype=torch.long, device=device)  # [b, 1]
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # [1]
        self.key_positions = torch.arange(max_sequence_length, device=device)  # [max_s]
        self.rotary_table: Tensor | None = None
        if model.rotary_pos_emb is not None:
            self.rotary_table = model.rotary_pos_emb(max_sequence_length)  # [max_s, 1, 1, rot]
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_logits: Tensor | None = None

    def _rotate(self, t: Tensor, freqs: Tensor) -> Tensor:
        config = self.model.config
        if config.apply_rope_fusion:
            return fused_apply_rotary_pos_emb(t, freqs, rotary_interleaved=config.rotary_interleaved)
        return apply_rotary_pos_emb(t, freqs, rotary_interleaved=config.rotary_interleaved)

    def _step(self) -> Tensor:
        """Logits `[b, v]` of the token in `self.tokens` at `self.position`; fills the caches."""
        with mixed_precision_context(self.model.config, self.device):  # as GPTModel.forward
            return self._step_layers()

    def _step_layers(self) -> Tensor:
        model = self.model
        embeddings = apply_module(model.embedding)(self.tokens)  # [b, 1, h]
        if model.position_embeddings is not None:
            embeddings = embeddings + model.position_embeddings(self.position)  # [b, 1, h]
        hidden = embeddings.transpose(0, 1).contiguous()  # [1, b, h]
        freqs = None
        if self.rotary_table is not None:
            freqs = self.rotary_table.index_select(0, self.position)  # [1, 1, 1, rot]
        blocked = (self.key_positions > self.position).view(1, 1, 1, -1)  # [1, 1, 1, max_s]
        for layer, attention in self.layers:
            normed = apply_module(layer.input_layernorm)(hidden)  # [1, b, h]
            query, key, value = attention.get_query_key_value_tensors(normed)  # [1, b, np|ng, hn]
            if freqs is not None:
                query = self._rotate(query, freqs)
                key = self._rotate(key, freqs)
            key_cache, value_cache = self.context.key_value_memory_dict[attention.layer_number]
            key_cache.index_copy_(0, self.position, key.to(key_cache.dtype))  # [max_s, b, ng, hn]
            value_cache.index_copy_(0, self.position, value.to(value_cache.dtype))
            context = apply_module(attention.core_attention)(
                query, key_cache, value_cache, blocked,
                attn_mask_type=AttnMaskType.arbitrary)  # [1, b, np * hn]
            out, bias = apply_module(attention.linear_proj)(context)  # [1, b, h]
            hidden = bias_dropout_add(out, bias, hidden, prob=0.0, training=False)
            normed = apply_module(layer.pre_mlp_layernorm)(hidden)
            out, bias = apply_module(layer.mlp)(normed)
            hidden = bias_dropout_add(out, bias, hidden, prob=0.0, training=False)  # [1, b, h]
        if model.decoder.final_layernorm is not None:
            hidden = apply_module(model.decoder.final_layernorm)(hidden)
        weight = model.embedding.weight if model.share_embeddings_and_output_weights else None
        logits, _ = apply_module(model.output_layer)(hidden, weight=weight,
                                                    runtime_gather_output=True)  # [1, b, v]
        return logits[0]  # [b, v]

    def _capture(self) -> Tensor:
        """Warm the step up on a side stream, then capture it; returns the graph's logits buffer."""
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]  # torch leaves Stream() unannotated
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles Triton kernels, creates cuBLAS handles and workspaces
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._step()
        self._graph, self._graph_logits = graph, logits
        return logits

    def _logits(self) -> Tensor:
        if not self.use_cuda_graph:
            return self._step()
        if self._graph is None or self._graph_logits is None:
            self._capture()
        assert self._graph is not None and self._graph_logits is not None
        self._graph.replay()
        return self._graph_logits

    @torch.inference_mode()
    def prefill(self, prompt_ids: Tensor, max_new_tokens: int) -> Tensor:
        """Run the prompts `[batch_size, p]` through the model, filling the caches.

        Returns the logits of the first new token `[batch_size, v]`; `step` then gives the
        following ones. The model must be in eval mode (`generate` sees to it).
        """
        _check_prompt(self.model, prompt_ids, max_new_tokens)
        if prompt_ids.shape[0] != self.batch_size:
            raise ValueError(f"this GraphDecoder decodes batches of {self.batch_size}; got "
                             f"{prompt_ids.shape[0]} prompts")
        prompt_len = prompt_ids.shape[1]
        if prompt_len + max_new_tokens > self.max_sequence_length:
            raise ValueError(f"prompt of {prompt_len} + {max_new_tokens} new tokens exceeds this "
                             f"decoder's max_sequence_length={self.max_sequence_length}")
        # Reuse the caches (and the captured graph's addresses): positions past the prompt
        # hold stale values until written, and the mask hides them.
        self.context.sequence_len_offset = 0
        logits = apply_module(self.model)(prompt_ids.to(self.device),
                                          inference_context=self.context)  # [b, p, v]
        self.position.fill_(prompt_len)
        return logits[:, -1]  # [b, v]

    @torch.inference_mode()
    def step(self, tokens: Tensor) -> Tensor:
        """Feed the chosen tokens `[batch_size]` and return the next logits `[batch_size, v]`.

        With a CUDA graph the result is the graph's output buffer: read it (choose the next
        token) before calling `step` again, which overwrites it.
        """
        self.tokens.copy_(tokens.view(self.batch_size, 1))
        logits = self._logits()  # [b, v]
        self.position.add_(1)
        return logits

    @torch.inference_mode()
    def generate(self, prompt_ids: Tensor, max_new_tokens: int) -> Tensor:
        """Greedy continuation of `prompt_ids` `[batch_size, p]`: the new tokens `[batch_size, n]`."""
        model = self.model
        was_training = model.training
        model.eval()
        try:
            token = self.prefill(prompt_ids, max_new_tokens).argmax(dim=-1)  # [b]
            generated = [token]
            for _ in range(max_new_tokens - 1):
                token = self.step(token).argmax(dim=-1)  # [b]
                generated.append(token)
        finally:
            model.train(was_training)
        return torch.stack(generated, dim=1)  # [b, n]
