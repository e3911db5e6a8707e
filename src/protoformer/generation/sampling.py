"""Choosing tokens: prompt checks, greedy or filtered sampling, seeded generators."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Generator, Sequence

import torch
from torch import Tensor

__all__ = ["MAX_SEED", "check_sampling", "check_seed", "inference", "prompt_tensor", "sample_next_token", "seeded_generator",
           "token_list"]


def prompt_tensor(prompt_ids: Sequence[int] | Tensor, vocab_size: int) -> Tensor:
    """One prompt as a CPU `[p]` long tensor; a clear error for empty, 2-D or out-of-vocabulary input."""
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


MAX_SEED = 2**62
"""Largest seed accepted: torch takes 64-bit seeds, and derived seeds (per rank, per
replica) add offsets to the one given."""


def check_seed(seed: object, name: str = "seed") -> int:
    """`seed` if it is an int in [0, MAX_SEED]; a ValueError naming the range otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        shown = repr(seed) if len(repr(seed)) <= 40 else repr(seed)[:37] + "..."
        raise ValueError(f"{name}={shown}: must be an integer from 0 to 2**62 ({MAX_SEED})")
    return seed


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """A ValueError naming the sampling option that is out of range."""
    if not (temperature >= 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature={temperature}: must be a finite number >= 0 (0 means "
                         "greedy)")
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
    check_sampling(temperature, top_k, top_p)
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


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with `seed` (fresh entropy when None); `seed` in [0, MAX_SEED]."""
    if seed is not None:
        check_seed(seed)
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


@contextlib.contextmanager
def inference(model: torch.nn.Module) -> Generator[None, None, None]:
    """Eval mode and `torch.inference_mode` for the block; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def token_list(ids: Tensor) -> list[int]:
    """A 1-D tensor of token ids as a list of Python ints."""
    return [int(value) for value in ids.detach().cpu().unbind(0)]
