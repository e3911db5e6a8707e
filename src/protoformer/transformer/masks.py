"""Attention masks: build, validate and combine them.

Convention, everywhere in protoformer: a *boolean* mask is True where attention is **blocked**;
a *floating* mask is **added** to the scores (0 keeps a position, `-inf` blocks it). Masks
broadcast to the score shape `[b, np, sq, sk]`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "causal_mask",
    "check_mask",
    "check_window_size",
    "combine_masks",
    "fully_blocked_rows",
    "padding_mask_from_attention_mask",
    "padding_mask_from_lengths",
    "sliding_window_mask",
    "to_additive_mask",
]


def causal_mask(sq: int, sk: int, device: torch.device | str | None = None) -> Tensor:
    """Boolean `[1, 1, sq, sk]` mask, True where key `j` lies in the future of query `i`.

    Bottom-right aligned: the queries are the *last* `sq` of the `sk` positions, so query `i`
    attends keys `j <= i + sk - sq`. With `sq == sk` this is the usual lower-triangular mask;
    with `sq < sk` (decoding against a key/value cache) the new queries see the whole cache.
    With `sq > sk` the first `sq - sk` queries see no key at all (their rows are fully blocked).
    """
    if sq < 1 or sk < 1:
        raise ValueError(f"causal_mask(sq={sq}, sk={sk}): both lengths must be >= 1")
    query_pos = torch.arange(sq, device=device).unsqueeze(1) + (sk - sq)  # [sq, 1]
    key_pos = torch.arange(sk, device=device).unsqueeze(0)  # [1, sk]
    return (key_pos > query_pos).view(1, 1, sq, sk)  # [1, 1, sq, sk]


def sliding_window_mask(sq: int, sk: int, window: int,
                        device: torch.device | str | None = None) -> Tensor:
    """Boolean `[1, 1, sq, sk]` mask, True where key `j` lies `window` or more positions before
    query `i`: each query sees at most the `window` keys ending at its own position.

    Aligned bottom-right as `causal_mask` (query `i` sits at position `i + sk - sq`); combine
    the two for causal sliding-window attention (Mistral's `sliding_window`: key `j` is kept
    when `query_pos - window < j <= query_pos`).
    """
    if sq < 1 or sk < 1 or window < 1:
        raise ValueError(f"sliding_window_mask(sq={sq}, sk={sk}, window={window}): all must be >= 1")
    query_pos = torch.arange(sq, device=device).unsqueeze(1) + (sk - sq)  # [sq, 1]
    key_pos = torch.arange(sk, device=device).unsqueeze(0)  # [1, sk]
    return (key_pos <= query_pos - window).view(1, 1, sq, sk)  # [1, 1, sq, sk]


def check_window_size(window_size: object, *, owner: str) -> int | None:
    """`window_size` if it is None or an int >= 1; `ValueError` naming `owner` otherwise."""
    if window_size is None:
        return None
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
        raise ValueError(f"{owner}(window_size={window_size!r}): the sliding window must be an "
                         "int >= 1 (the keys each query sees), or None for no window")
    return window_size


def padding_mask_from_lengths(lengths: Tensor, sk: int | None = None) -> Tensor:
    """Boolean `[b, 1, 1, sk]` mask blocking key positions at or beyond each sequence's length.

    `lengths` is `[b]` (integers, the number of valid keys of each batch entry, left-aligned);
    `sk` defaults to the largest length.
    """
    if lengths.dim() != 1 or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(f"padding_mask_from_lengths: lengths must be a 1-D integer tensor [b], "
                         f"got shape {tuple(lengths.shape)} and dtype {lengths.dtype}")
    if sk is None:
        sk = int(lengths.max().item()) if lengths.numel() > 0 else 0
    if sk < 1:
        raise ValueError(f"padding_mask_from_lengths: sk={sk} must be >= 1")
    key_pos = torch.arange(sk, device=lengths.device)  # [sk]
    blocked = key_pos.unsqueeze(0) >= lengths.unsqueeze(1)  # [b, sk]
    return blocked[:, None, None, :]  # [b, 1, 1, sk]


def padding_mask_from_attention_mask(attention_mask: Tensor) -> Tensor:
    """Boolean `[b, 1, 1, sk]` blocked mask from a Hugging Face style `[b, sk]` mask (1 keep, 0 pad).

    Note the inversion: Hugging Face marks *kept* tokens with 1 (or True); the result is True
    where attention is *blocked*. Padding may be on either side.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"padding_mask_from_attention_mask expects a [b, sk] mask of 1 (keep) and "
                         f"0 (padding), got shape {tuple(attention_mask.shape)}")
    blocked = attention_mask == 0  # [b, sk]
    return blocked[:, None, None, :]  # [b, 1, 1, sk]


def check_mask(mask: Tensor, shape: tuple[int, int, int, int], *, what: str = "attention_mask") -> None:
    """Raise unless `mask` is boolean or floating and broadcasts to `shape` = `(b, np, sq, sk)`."""
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(f"{what} has dtype {mask.dtype}; expected torch.bool (True = blocked) or a "
                        "floating dtype (added to the scores). Convert a 0/1 mask with "
                        "`mask.bool()` after checking which value means 'blocked'")
    if mask.dim() > 4 or not _broadcasts(tuple(mask.shape), shape):
        b, heads, sq, sk = shape
        raise ValueError(
            f"{what} has shape {tuple(mask.shape)}, which does not broadcast to "
            f"[b, np, sq, sk] = [{b}, {heads}, {sq}, {sk}]; expected e.g. [{b}, 1, 1, {sk}] "
            f"(padding) or [{b}, 1, {sq}, {sk}] / [1, 1, {sq}, {sk}] (per query). A Hugging Face "
            "[b, sk] mask of 1/0 must first go through padding_mask_from_attention_mask")


def _broadcasts(given: tuple[int, ...], target: tuple[int, ...]) -> bool:
    for have, want in zip(reversed(given), reversed(target), strict=False):
        if have not in (1, want):
            return False
    return True


def to_additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A mask as floating values to add to the scores: a boolean one becomes 0 / `-inf`."""
    if mask.dtype == torch.bool:
        zeros = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        return zeros.masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def combine_masks(*masks: Tensor | None) -> Tensor | None:
    """Combine masks so a position is blocked when any of them blocks it.

    All boolean: their logical OR (boolean). Any floating: the sum of the floating masks plus
    `-inf` where a boolean one blocks (floating, in the floating masks' promoted dtype). `None`
    entries are skipped; the result is None when every entry is None.
    """
    present = [m for m in masks if m is not None]
    if not present:
        return None
    floating = [m for m in present if m.dtype != torch.bool]
    boolean = [m for m in present if m.dtype == torch.bool]
    blocked: Tensor | None = None
    for mask in boolean:
        blocked = mask if blocked is None else blocked | mask
    if not floating:
        return blocked
    dtype = floating[0].dtype
    for mask in floating[1:]:
        dtype = torch.promote_types(dtype, mask.dtype)
    total = floating[0].to(dtype)
    for mask in floating[1:]:
        total = total + mask.to(dtype)
    if blocked is not None:
        # torch.where broadcasts both ways (masked_fill only broadcasts the mask).
        total = torch.where(blocked, total.new_full((), float("-inf")), total)
    return total


def fully_blocked_rows(mask: Tensor) -> Tensor:
    """Boolean `[..., sq, 1]`: True for query rows where `mask` blocks every key.

    Softmax over such a row is 0/0; the core attention implementations detect these rows with
    this function and return zeros for them.
    """
    if mask.dtype == torch.bool:
        return mask.all(dim=-1, keepdim=True)
    return torch.isneginf(mask).all(dim=-1, keepdim=True)
