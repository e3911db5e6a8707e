"""Batched greedy decoding whose per-token step is the model's own forward, as one CUDA graph.

A decode step of a small model is a few hundred tiny kernels; launched one by one from
Python, the GPU waits on the host. A CUDA graph replays all of them with one launch, but it
fixes every shape and every address, while the ordinary KV-cache forward slices the cache to
the current length and writes it at a Python-int offset. `GPTModel`'s static-shape decoding
mode (an `InferenceContext` whose `positions` is set) has fixed shapes instead:

- each row's next position is a device tensor `positions [b]`, so prompts of different
  lengths decode together (row b writes and reads at its own position);
- every self-attention layer writes its keys/values at those positions into the caches of
  the full `max_sequence_length` and attends over the whole cache, later positions blocked
  by a mask (blocked scores contribute exactly zero to the softmax);
- the rotary angles are rows of one table gathered by position; the model advances
  `positions` in place, inside the captured graph.

So the step is `model(tokens, inference_context=...)`: the same layers, whatever the backend,
eager (CPU, or `use_cuda_graph=False`) or captured. The prompts are prefilled by the ordinary
forward, right-padded to the longest (row b's pad sits after its last token, where the
causal mask hides it from the prompt and the decode mask until a new token overwrites it).

Supported: `GPTModel`s whose layers are `TransformerLayer`s with `SelfAttention` and no
cross-attention, on one tensor-parallel rank.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from torch import Tensor

from protoformer.generation.sampling import token_list
from protoformer.models.gpt import GPTModel
from protoformer.spec import apply_module
from protoformer.transformer.attention import SelfAttention
from protoformer.transformer.inference import InferenceContext
from protoformer.transformer.layer import TransformerLayer

__all__ = ["GraphDecoder", "greedy_generate", "pad_prompts"]

# Rows that stopped are checked on the host every this many steps (a device sync each time).
_STOP_CHECK_EVERY = 8


def pad_prompts(prompts: Sequence[Sequence[int]] | Tensor, *, pad_token_id: int = 0,
                device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Right-pad prompts of different lengths: `(ids [b, max_p], lengths [b])`.

    A 2-D tensor is taken as equal-length prompts (no padding).
    """
    if isinstance(prompts, Tensor):
        if prompts.dim() != 2 or prompts.shape[1] < 1:
            raise ValueError(f"prompt_ids must be [batch, prompt_length] with at least one "
                             f"token, got shape {tuple(prompts.shape)}")
        lengths = torch.full((prompts.shape[0],), prompts.shape[1], dtype=torch.long)
        return prompts.to(device), lengths.to(device)
    rows = [list(prompt) for prompt in prompts]
    if not rows or any(len(row) == 0 for row in rows):
        raise ValueError("every prompt needs at least one token (and at least one prompt)")
    longest = max(len(row) for row in rows)
    ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)  # [b, max_p]
    for index, row in enumerate(rows):
        ids[index, :len(row)] = torch.tensor(row, dtype=torch.long)
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)  # [b]
    return ids.to(device), lengths.to(device)


def _check_supported(model: GPTModel) -> None:
    if model.pg.tp_size != 1:
        raise ValueError("GraphDecoder runs on one tensor-parallel rank; the model has "
                         f"tp_size={model.pg.tp_size}")
    if model.config.rope_scaling in ("dynamic", "longrope"):
        raise ValueError("GraphDecoder rotates with one rotary table for every step; "
                         f"{model.config.rope_scaling!r} rope scaling changes the table with the "
                         "length: decode eagerly (generate(..., cuda_graph=False))")
    for layer in model.decoder.layers:
        if not isinstance(layer, TransformerLayer) or layer.cross_attention is not None \
                or not isinstance(layer.self_attention, SelfAttention):
            raise TypeError(f"GraphDecoder supports TransformerLayer with SelfAttention and no "
                            f"cross-attention; got {type(layer).__qualname__} holding "
                            f"{type(getattr(layer, 'self_attention', None)).__qualname__}")


class GraphDecoder:
    """Greedy decoding of up to `batch_size` prompts of any lengths, one CUDA graph replay a token.

    Build once per (model, batch size, maximum length) and call `generate` (or `prefill`
    then `step`) as often as you like: the graph is captured on the first prefill and
    replayed afterwards (the caches and the step's buffers stay allocated). Without CUDA, or
    with `use_cuda_graph=False`, the same static step runs eagerly.
    """

    def __init__(self, model: GPTModel, *, batch_size: int, max_sequence_length: int,
                 use_cuda_graph: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"GraphDecoder(batch_size={batch_size}): must be >= 1")
        if not 1 <= max_sequence_length <= model.max_sequence_length:
            raise ValueError(f"GraphDecoder(max_sequence_length={max_sequence_length}): must be in "
                             f"[1, {model.max_sequence_length}] (the model's maximum)")
        _check_supported(model)
        self.model = model
        self.batch_size = batch_size
        self.max_sequence_length = max_sequence_length
        device = model.embedding.weight.device
        self.device = device
        self.use_cuda_graph = use_cuda_graph and device.type == "cuda"
        self.context = InferenceContext(max_batch_size=batch_size,
                                        max_sequence_length=max_sequence_length,
                                        roll_window_caches=False)
        self.tokens = torch.zeros((batch_size, 1), dtype=torch.long, device=device)  # [b, 1]
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)  # [b]
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_logits: Tensor | None = None

    def _step(self) -> Tensor:
        """Logits `[b, v]` of `self.tokens` at `self.positions`; fills the caches, advances positions."""
        # A row that stopped keeps being fed (its tokens are discarded): keep its writes
        # inside the cache (this is part of the captured graph).
        self.positions.clamp_(max=self.max_sequence_length - 1)
        self.context.positions = self.positions
        return apply_module(self.model)(self.tokens, inference_context=self.context)[:, -1]

    def _capture(self) -> None:
        """Warm the step up on a side stream, then capture it (before a prefill: the warm-up
        writes stale cache rows that the prefill and later steps overwrite)."""
        self.positions.zero_()
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

    @torch.inference_mode()
    def prefill(self, prompt_ids: Tensor, max_new_tokens: int, *,
                prompt_lengths: Tensor | None = None) -> Tensor:
        """Run the prompts `[batch_size, p]` through the model, filling the caches.

        `prompt_lengths [batch_size]` gives each row's length (its tokens first, padding
        after); None means every row is `p` long. Returns the logits of each row's first new
        token `[batch_size, v]`; `step` then gives the following ones. The model must be in
        eval mode (`generate` sees to it).
        """
        if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1:
            raise ValueError(f"prompt_ids must be [batch, prompt_length] with at least one "
                             f"token, got shape {tuple(prompt_ids.shape)}")
        if prompt_ids.shape[0] != self.batch_size:
            raise ValueError(f"this GraphDecoder decodes batches of {self.batch_size}; got "
                             f"{prompt_ids.shape[0]} prompts")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        prompt_len = prompt_ids.shape[1]
        if prompt_len + max_new_tokens > self.max_sequence_length:
            raise ValueError(f"prompt of {prompt_len} + {max_new_tokens} new tokens exceeds this "
                             f"decoder's max_sequence_length={self.max_sequence_length}")
        lengths = torch.full((self.batch_size,), prompt_len, dtype=torch.long) \
            if prompt_lengths is None else prompt_lengths.detach().to("cpu", torch.long)
        if lengths.shape != (self.batch_size,) or int(lengths.min()) < 1 \
                or int(lengths.max()) > prompt_len:
            raise ValueError(f"prompt_lengths must hold one length in [1, {prompt_len}] per row, "
                             f"got {token_list(lengths)}")
        if self.use_cuda_graph and self._graph is None:
            self._capture()
        # The ordinary KV-cache forward from position 0 into the same caches.
        self.context.positions = None
        self.context.sequence_len_offset = 0
        logits = apply_module(self.model)(prompt_ids.to(self.device),
                                          inference_context=self.context)  # [b, p, v]
        lengths = lengths.to(self.device)
        self.positions.copy_(lengths)
        self.context.positions = self.positions
        rows = torch.arange(self.batch_size, device=self.device)
        return logits[rows, lengths - 1]  # [b, v]

    @torch.inference_mode()
    def step(self, tokens: Tensor) -> Tensor:
        """Feed the chosen tokens `[batch_size]` and return the next logits `[batch_size, v]`.

        With a CUDA graph the result is the graph's output buffer: read it (choose the next
        token) before calling `step` again, which overwrites it.
        """
        self.tokens.copy_(tokens.view(self.batch_size, 1))
        if not self.use_cuda_graph:
            return self._step()
        assert self._graph is not None and self._graph_logits is not None  # captured by prefill
        self._graph.replay()
        return self._graph_logits

    @torch.inference_mode()
    def generate(self, prompt_ids: Tensor, max_new_tokens: int, *,
                 prompt_lengths: Tensor | None = None, stop_token_ids: Collection[int] = (),
                 pad_token_id: int = 0) -> Tensor:
        """Greedy continuations `[batch_size, max_new_tokens]` of `prompt_ids` `[batch_size, p]`.

        A row that emits a token of `stop_token_ids` keeps it and is padded with
        `pad_token_id` after; decoding ends early once every row has stopped.
        """
        model = self.model
        was_training = model.training
        model.eval()
        try:
            return self._generate(prompt_ids, max_new_tokens, prompt_lengths, stop_token_ids,
                                  pad_token_id)
        finally:
            model.train(was_training)

    def _generate(self, prompt_ids: Tensor, max_new_tokens: int, prompt_lengths: Tensor | None,
                  stop_token_ids: Collection[int], pad_token_id: int) -> Tensor:
        token = self.prefill(prompt_ids, max_new_tokens,
                             prompt_lengths=prompt_lengths).argmax(dim=-1)  # [b]
        stops = torch.tensor(sorted(int(t) for t in stop_token_ids), dtype=torch.long,
                             device=self.device)  # [k]
        finished = torch.isin(token, stops)  # [b]
        generated = [token]
        for index in range(1, max_new_tokens):
            if stops.numel() and index % _STOP_CHECK_EVERY == 0 and bool(finished.all()):
                break
            token = self.step(token).argmax(dim=-1)  # [b]
            token = token.masked_fill(finished, pad_token_id)
            finished = finished | torch.isin(token, stops)
            generated.append(token)
        out = torch.stack(generated, dim=1)  # [b, n']
        if out.shape[1] < max_new_tokens:
            out = torch.nn.functional.pad(out, (0, max_new_tokens - out.shape[1]),
                                          value=pad_token_id)
        return out  # [b, n]


@torch.inference_mode()
def greedy_generate(model: GPTModel, prompts: Sequence[Sequence[int]] | Tensor,
                    max_new_tokens: int, *, stop_token_ids: Collection[int] = (),
                    pad_token_id: int = 0, use_cuda_graph: bool = False) -> Tensor:
    """Batched greedy decoding of prompts of any lengths: the new tokens `[b, max_new_tokens]`.

    `prompts` is a list of token-id lists (or a `[b, p]` tensor of equal-length prompts).
    Rows stop after a token of `stop_token_ids` (padded with `pad_token_id` after). This
    builds a `GraphDecoder` for the call, eager unless `use_cuda_graph`; keep a
    `GraphDecoder` to decode many batches with one captured graph.
    """
    device = model.embedding.weight.device
    ids, lengths = pad_prompts(prompts, pad_token_id=pad_token_id, device=device)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    total = ids.shape[1] + max_new_tokens
    if total > model.max_sequence_length:
        raise ValueError(f"prompt of {ids.shape[1]} + {max_new_tokens} new tokens exceeds the "
                         f"model's max_sequence_length={model.max_sequence_length}")
    decoder = GraphDecoder(model, batch_size=ids.shape[0], max_sequence_length=total,
                           use_cuda_graph=use_cuda_graph)
    return decoder.generate(ids, max_new_tokens, prompt_lengths=lengths,
                            stop_token_ids=stop_token_ids, pad_token_id=pad_token_id)
