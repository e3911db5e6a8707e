"""Autoregressive generation with a KV cache: prefill the prompt once, then one token a step."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import torch
from torch import Tensor

from protoformer.generation.graph_decoder import GraphDecoder, pad_prompts
from protoformer.generation.sampling import (
    check_sampling,
    inference,
    prompt_tensor,
    sample_next_token,
    seeded_generator,
    token_list,
)
from protoformer.models import GPTModel, T5Model
from protoformer.spec import apply_module
from protoformer.transformer.inference import InferenceContext

__all__ = ["generate", "generate_batch", "generate_seq2seq"]


def _sampling_loop(first_logits: Callable[[], Tensor], next_logits: Callable[[int], Tensor],
                   num_new: int, *, stop: frozenset[int], stream: Callable[[int], None] | None,
                   temperature: float, top_k: int | None, top_p: float | None, greedy: bool,
                   generator: torch.Generator) -> list[int]:
    """Choose up to `num_new` tokens: from `first_logits()`, then `next_logits(last token)`."""
    new_tokens: list[int] = []
    logits = first_logits()  # [v]
    while True:
        token = sample_next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                  greedy=greedy, generator=generator)
        new_tokens.append(token)
        if stream is not None:
            stream(token)
        if len(new_tokens) == num_new or token in stop:
            return new_tokens
        logits = next_logits(token)


def generate(
    model: GPTModel,
    prompt_ids: Sequence[int] | Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    seed: int | None = None,
    stream: Callable[[int], None] | None = None,
    stop_token_ids: Collection[int] = (),
    cuda_graph: bool | None = None,
) -> list[int]:
    """Continue `prompt_ids` (one sequence of token ids) by up to `max_new_tokens` tokens.

    The prompt is run once to fill the model's KV caches (an `InferenceContext`); each later
    step feeds only the newest token. Generation stops early when the sequence reaches the
    model's `max_sequence_length`, and after emitting a token of `stop_token_ids` (an
    end-of-sequence token; it is the last one returned and streamed). `stream` is called with
    each token as it is chosen; `seed` makes sampling reproducible. Returns the new tokens
    (not the prompt).

    `cuda_graph`: run each decode step as one CUDA graph replay
    (`protoformer.generation.GraphDecoder`), which removes the per-kernel launch cost
    that dominates small-batch decoding. None (default) uses it when the model is on a GPU and
    its layers are supported (self-attention `TransformerLayer`s on one rank); True requires
    it (on the CPU the same static-shape step runs eagerly); False never uses it.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 0")
    check_sampling(temperature, top_k, top_p)
    stop = frozenset(int(token) for token in stop_token_ids)
    prompt = prompt_tensor(prompt_ids, model.vocab_size)  # [p]
    limit = model.max_sequence_length
    if prompt.numel() > limit:
        raise ValueError(f"the prompt has {prompt.numel()} tokens, more than the model's "
                         f"max_sequence_length={limit}; shorten it")
    total = min(prompt.numel() + max_new_tokens, limit)
    num_new = total - prompt.numel()
    if num_new == 0:
        return []
    device = next(model.parameters()).device
    generator = seeded_generator(seed)
    decoder: GraphDecoder | _EagerDecoder = (
        _graph_decoder(model, 1, total, cuda_graph, device) or _EagerDecoder(model, total))

    def step(token: int) -> Tensor:
        return decoder.step(torch.tensor([token], dtype=torch.long, device=device))[0]  # [v]

    with inference(model):
        return _sampling_loop(
            lambda: decoder.prefill(prompt[None].to(device), num_new)[0], step, num_new,
            stop=stop, stream=stream, temperature=temperature, top_k=top_k, top_p=top_p,
            greedy=greedy, generator=generator)


def generate_batch(
    model: GPTModel,
    prompts: Sequence[Sequence[int] | Tensor],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    seed: int | None = None,
    stop_token_ids: Collection[int] = (),
    cuda_graph: bool | None = None,
) -> list[list[int]]:
    """Continue several prompts of any lengths together: one list of new tokens per prompt.

    The prompts decode as one batch (right-padded for the prefill, then each row at its own
    position: `GraphDecoder`'s static step, one CUDA graph replay a token on a GPU with
    `cuda_graph` None or True, the same step eagerly otherwise). Each row stops after its own
    token of `stop_token_ids`; every row gets at most `max_new_tokens`, and no more than the
    longest prompt leaves room for under `max_sequence_length`. Greedy rows equal `generate`
    of each prompt alone; sampling draws the rows in order from one `seed`ed generator.
    Models the static step does not support (e.g. multi-latent attention) decode prompt by
    prompt with the KV-cache loop (each from `seed`), unless `cuda_graph=True`, which raises.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 0")
    check_sampling(temperature, top_k, top_p)
    rows = [prompt_tensor(prompt, model.vocab_size) for prompt in prompts]  # [p_i] each
    if not rows:
        return []
    longest = max(row.numel() for row in rows)
    limit = model.max_sequence_length
    if longest > limit:
        raise ValueError(f"a prompt has {longest} tokens, more than the model's "
                         f"max_sequence_length={limit}; shorten it")
    num_new = min(longest + max_new_tokens, limit) - longest
    if num_new == 0:
        return [[] for _ in rows]
    device = next(model.parameters()).device
    try:
        decoder = GraphDecoder(model, batch_size=len(rows), max_sequence_length=longest + num_new,
                               use_cuda_graph=device.type == "cuda" if cuda_graph is None
                               else cuda_graph)
    except (TypeError, ValueError):
        if cuda_graph:
            raise
        return [generate(model, row, num_new, temperature=temperature, top_k=top_k, top_p=top_p,
                         greedy=greedy, seed=seed, stop_token_ids=stop_token_ids,
                         cuda_graph=False) for row in rows]
    ids, lengths = pad_prompts([token_list(row) for row in rows],
                               device=device)  # [b, p], [b]
    stop = frozenset(int(token) for token in stop_token_ids)
    generator = seeded_generator(seed)
    chosen: list[list[int]] = [[] for _ in rows]
    with inference(model):
        logits = decoder.prefill(ids, num_new, prompt_lengths=lengths)  # [b, v]
        for _ in range(num_new):
            if greedy or temperature == 0.0:
                tokens = token_list(logits.argmax(dim=-1))  # [b]
            else:
                tokens = [sample_next_token(row_logits, temperature=temperature, top_k=top_k,
                                            top_p=top_p, generator=generator)
                          for row_logits in logits.unbind(0)]
            for row, token in zip(chosen, tokens, strict=True):
                if not row or row[-1] not in stop:
                    row.append(token)
            if all(len(row) == num_new or row[-1] in stop for row in chosen):
                break
            logits = decoder.step(torch.tensor(tokens, dtype=torch.long, device=device))
    return chosen


def generate_seq2seq(
    model: T5Model,
    input_ids: Sequence[int] | Tensor,
    max_new_tokens: int,
    *,
    decoder_start_token_id: int = 0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    seed: int | None = None,
    stream: Callable[[int], None] | None = None,
    stop_token_ids: Collection[int] = (),
) -> list[int]:
    """The encoder-decoder counterpart of `generate`: read `input_ids`, write up to `max_new_tokens`.

    The encoder runs once over `input_ids` (one sequence); the decoder starts from
    `decoder_start_token_id` (T5: the padding id 0) and adds one token a step, keeping its
    self-attention keys/values and each layer's projected encoder output in an
    `InferenceContext`. Sampling, `stream`, `seed` and `stop_token_ids` behave as in
    `generate`; the decoder stops at the model's `max_sequence_length`. Returns the new tokens
    (without the start token).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 0")
    check_sampling(temperature, top_k, top_p)
    source = prompt_tensor(input_ids, model.vocab_size)  # [se]
    start = prompt_tensor([decoder_start_token_id], model.vocab_size)  # [1]
    limit = model.max_sequence_length
    if source.numel() > limit:
        raise ValueError(f"the input has {source.numel()} tokens, more than the model's "
                         f"max_sequence_length={limit}; shorten it")
    num_new = min(max_new_tokens, limit - 1)
    if num_new == 0:
        return []
    stop = frozenset(int(token) for token in stop_token_ids)
    device = next(model.parameters()).device
    generator = seeded_generator(seed)
    context = InferenceContext(max_batch_size=1, max_sequence_length=num_new + 1)
    with inference(model):
        memory = model.encode(source[None].to(device))  # [se, 1, h]

        def decode(token_ids: Tensor) -> Tensor:
            return model.decode(token_ids, memory, inference_context=context)[0, -1]  # [v]

        return _sampling_loop(
            lambda: decode(start[None].to(device)),
            lambda token: decode(torch.tensor([[token]], dtype=torch.long, device=device)),
            num_new, stop=stop, stream=stream, temperature=temperature, top_k=top_k,
            top_p=top_p, greedy=greedy, generator=generator)


class _EagerDecoder:
    """The plain KV-cache loop, with `GraphDecoder`'s `prefill` / `step` interface."""

    def __init__(self, model: GPTModel, max_sequence_length: int) -> None:
        self.forward = apply_module(model)
        self.max_sequence_length = max_sequence_length
        self.context = InferenceContext(max_batch_size=1, max_sequence_length=max_sequence_length)
        rotary = model.rotary_pos_emb
        self.recompute_after = rotary.recompute_after if rotary is not None else None
        self.fed: Tensor | None = None  # [b, n] every token fed so far (for a recompute)

    def prefill(self, prompt_ids: Tensor, max_new_tokens: int) -> Tensor:
        del max_new_tokens  # the context was sized for it
        self.fed = prompt_ids
        return self.forward(prompt_ids, inference_context=self.context)[:, -1]  # [b, v]

    def step(self, tokens: Tensor) -> Tensor:
        new = tokens.view(-1, 1)  # [b, 1]
        assert self.fed is not None, "prefill first"
        self.fed = torch.cat((self.fed, new), dim=1)  # [b, n + 1]
        if self.recompute_after is not None and self.fed.shape[1] == self.recompute_after + 1:
            # The rotary angles of every position just changed (LongRoPE): the cached keys
            # are stale, so run the whole sequence again into a fresh cache.
            self.context = InferenceContext(max_batch_size=1,
                                            max_sequence_length=self.max_sequence_length)
            return self.forward(self.fed, inference_context=self.context)[:, -1]  # [b, v]
        return self.forward(new, inference_context=self.context)[:, -1]  # [b, v]


def _graph_decoder(model: GPTModel, batch_size: int, total: int, cuda_graph: bool | None,
                   device: torch.device) -> GraphDecoder | None:
    """The CUDA-graph decoder `generate` should use, or None for the eager loop."""
    if cuda_graph is False or (cuda_graph is None and device.type != "cuda"):
        return None
    try:
        return GraphDecoder(model, batch_size=batch_size, max_sequence_length=total)
    except (TypeError, ValueError):
        if cuda_graph:
            raise
        return None  # auto: a model GraphDecoder does not support decodes eagerly
