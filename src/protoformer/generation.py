"""Autoregressive generation with a KV cache: prefill the prompt once, then one token a step."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Generator, Sequence

import torch
from torch import Tensor

from protoformer.kernels.graph_decode import GraphDecoder
from protoformer.models import GPTModel, T5Model
from protoformer.spec import apply_module
from protoformer.transformer.inference import InferenceContext

__all__ = ["generate", "generate_seq2seq", "sample_next_token"]


def _prompt_tensor(prompt_ids: Sequence[int] | Tensor, vocab_size: int) -> Tensor:
    prompt = prompt_ids.detach().cpu() if isinstance(prompt_ids, Tensor) \
        else torch.tensor(list(prompt_ids), dtype=torch.long)
    if prompt.dim() != 1:
        raise ValueError(f"prompt_ids must be one sequence (1-D), got shape {tuple(prompt.shape)}")
    if prompt.numel() == 0:
        raise ValueError("the prompt is empty; generation needs at least one prompt token")
    if prompt.is_floating_point() or prompt.is_complex():
        raise ValueError(f"prompt_ids must be integer token ids, got dtype {prompt.dtype}")
    prompt = prompt.long()  # [p]
    outside = prompt[(prompt < 0) | (prompt >= vocab_size)]
    if outside.numel() > 0:
        shown = ", ".join(str(int(t)) for t in outside[:5])
        raise ValueError(f"prompt token id(s) {shown} are outside the model's vocabulary "
                         f"[0, {vocab_size}); encode the prompt with the model's tokenizer")
    return prompt


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0.0:
        raise ValueError(f"temperature={temperature}: must be >= 0 (0 means greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k}: must be >= 1 (or None for no limit)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p}: must be in (0, 1] (or None for no limit)")


def sample_next_token(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> int:
    """Choose a token from one position's logits `[v]`: argmax, or a sample after filtering.

    `top_k` keeps the k highest-scoring tokens; `top_p` keeps the smallest set of tokens whose
    probabilities sum to at least p (always at least one). `temperature=0` is greedy.
    """
    _check_sampling(temperature, top_k, top_p)
    if greedy or temperature == 0.0:
        return int(torch.argmax(logits))
    scores = logits.detach().float().cpu() / temperature  # [v]
    if top_k is not None and top_k < scores.numel():
        kth_best = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)  # [v], [v]
        probabilities = torch.softmax(sorted_scores, dim=-1)
        mass_before = torch.cumsum(probabilities, dim=-1) - probabilities  # [v]
        sorted_scores = sorted_scores.masked_fill(mass_before >= top_p, float("-inf"))
        scores = torch.empty_like(scores).scatter_(0, order, sorted_scores)  # [v]
    probabilities = torch.softmax(scores, dim=-1)  # [v]
    return int(torch.multinomial(probabilities, 1, generator=generator))


def _seeded_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


@contextlib.contextmanager
def _inference(model: torch.nn.Module) -> Generator[None, None, None]:
    """Eval mode and `torch.inference_mode` for the block; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


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
    (`protoformer.kernels.graph_decode.GraphDecoder`), which removes the per-kernel launch cost
    that dominates small-batch decoding. None (default) uses it when the model is on a GPU and
    its layers are supported (self-attention `TransformerLayer`s on one rank); True requires
    it (on the CPU the same static-shape step runs eagerly); False never uses it.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 0")
    _check_sampling(temperature, top_k, top_p)
    stop = frozenset(int(token) for token in stop_token_ids)
    prompt = _prompt_tensor(prompt_ids, model.vocab_size)  # [p]
    limit = model.max_sequence_length
    if prompt.numel() > limit:
        raise ValueError(f"the prompt has {prompt.numel()} tokens, more than the model's "
                         f"max_sequence_length={limit}; shorten it")
    total = min(prompt.numel() + max_new_tokens, limit)
    num_new = total - prompt.numel()
    if num_new == 0:
        return []
    device = next(model.parameters()).device
    generator = _seeded_generator(seed)
    decoder: GraphDecoder | _EagerDecoder = (
        _graph_decoder(model, total, cuda_graph, device) or _EagerDecoder(model, total))

    def step(token: int) -> Tensor:
        return decoder.step(torch.tensor([token], dtype=torch.long, device=device))[0]  # [v]

    with _inference(model):
        return _sampling_loop(
            lambda: decoder.prefill(prompt[None].to(device), num_new)[0], step, num_new,
            stop=stop, stream=stream, temperature=temperature, top_k=top_k, top_p=top_p,
            greedy=greedy, generator=generator)


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
    _check_sampling(temperature, top_k, top_p)
    source = _prompt_tensor(input_ids, model.vocab_size)  # [se]
    start = _prompt_tensor([decoder_start_token_id], model.vocab_size)  # [1]
    limit = model.max_sequence_length
    if source.numel() > limit:
        raise ValueError(f"the input has {source.numel()} tokens, more than the model's "
                         f"max_sequence_length={limit}; shorten it")
    num_new = min(max_new_tokens, limit - 1)
    if num_new == 0:
        return []
    stop = frozenset(int(token) for token in stop_token_ids)
    device = next(model.parameters()).device
    generator = _seeded_generator(seed)
    context = InferenceContext(max_batch_size=1, max_sequence_length=num_new + 1)
    with _inference(model):
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
        self.context = InferenceContext(max_batch_size=1, max_sequence_length=max_sequence_length)

    def prefill(self, prompt_ids: Tensor, max_new_tokens: int) -> Tensor:
        del max_new_tokens  # the context was sized for it
        return self.forward(prompt_ids, inference_context=self.context)[:, -1]  # [b, v]

    def step(self, tokens: Tensor) -> Tensor:
        return self.forward(tokens.view(-1, 1), inference_context=self.context)[:, -1]  # [b, v]


def _graph_decoder(model: GPTModel, total: int, cuda_graph: bool | None,
                   device: torch.device) -> GraphDecoder | None:
    """The CUDA-graph decoder `generate` should use, or None for the eager loop."""
    if cuda_graph is False or (cuda_graph is None and device.type != "cuda"):
        return None
    try:
        return GraphDecoder(model, batch_size=1, max_sequence_length=total)
    except (TypeError, ValueError):
        if cuda_graph:
            raise
        return None  # auto: a model GraphDecoder does not support decodes eagerly
