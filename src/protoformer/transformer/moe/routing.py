"""The routing math of `TopKRouter` as plain functions: scores, (group-limited) top-k,
capacity dropping, the load-balancing loss and the z-loss (Megatron-Core's definitions).

Shapes: `T` tokens, `E` experts, `k` experts per token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from protoformer.config import TransformerConfig

__all__ = [
    "apply_capacity",
    "expert_capacity",
    "group_limited_topk",
    "load_balancing_loss",
    "scores_for_aux_loss",
    "topk_routing",
    "updated_expert_bias",
    "z_loss",
]


def group_limited_topk(scores: Tensor, topk: int, num_groups: int, group_topk: int) -> tuple[Tensor, Tensor]:
    """Top-k restricted to the `group_topk` best of `num_groups` equal expert groups.

    A group's score is the sum of its best `topk // group_topk` expert scores (DeepSeek-V3:
    8 // 4 = 2). `scores [T, E]` -> (selected scores `[T, k]`, expert indices `[T, k]`).
    """
    tokens, experts = scores.shape
    per_group = scores.view(tokens, num_groups, experts // num_groups)  # [T, G, E/G]
    group_scores = per_group.topk(topk // group_topk, dim=-1).values.sum(dim=-1)  # [T, G]
    group_index = group_scores.topk(group_topk, dim=-1, sorted=False).indices  # [T, g]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_index, True)
    expert_mask = group_mask.unsqueeze(-1).expand_as(per_group).reshape(tokens, experts)
    masked = scores.masked_fill(~expert_mask, float("-inf"))  # [T, E]
    top = masked.topk(topk, dim=-1)
    return top.values, top.indices


def _topk(scores: Tensor, config: TransformerConfig) -> tuple[Tensor, Tensor]:
    groups, group_topk = config.moe_router_num_groups, config.moe_router_group_topk
    if groups is not None and group_topk is not None:
        return group_limited_topk(scores, config.moe_router_topk, groups, group_topk)
    top = scores.topk(config.moe_router_topk, dim=-1)
    return top.values, top.indices


def topk_routing(logits: Tensor, config: TransformerConfig,
                 expert_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`logits [T, E]` (float32 or wider) -> `(probs [T, k], top_indices [T, k])`.

    softmax: without `moe_router_pre_softmax` the softmax runs over the `k` selected logits
    (= softmax over all, renormalised over the top-k); with it, over all experts and the top-k
    probabilities are kept as they are. sigmoid: `expert_bias` (aux-loss-free balancing) shifts
    only the *choice*; the weights are the unbiased scores, divided by their sum when
    `config.moe_normalizes_topk_probs`. Then `moe_router_topk_scaling_factor` multiplies.
    """
    if config.moe_router_score_function == "softmax":
        if config.moe_router_pre_softmax:
            probs, indices = _topk(torch.softmax(logits, dim=-1), config)
        else:
            selected, indices = _topk(logits, config)
            probs = torch.softmax(selected, dim=-1)
    else:
        scores = torch.sigmoid(logits)  # [T, E]
        if expert_bias is not None:
            _, indices = _topk(scores + expert_bias.to(scores.dtype), config)
            probs = scores.gather(1, indices)
        else:
            probs, indices = _topk(scores, config)
        if config.moe_normalizes_topk_probs and config.moe_router_topk > 1:
            probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-20)
    if config.moe_router_topk_scaling_factor is not None:
        probs = probs * config.moe_router_topk_scaling_factor
    return probs, indices


def scores_for_aux_loss(logits: Tensor, config: TransformerConfig) -> Tensor:
    """Every expert's routing score `[T, E]` that the load-balancing loss averages: the softmax
    over all experts, or the sigmoid scores normalised per token."""
    if config.moe_router_score_function == "softmax":
        return torch.softmax(logits, dim=-1)
    scores = torch.sigmoid(logits)
    return scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)


def load_balancing_loss(scores: Tensor, tokens_per_expert: Tensor, topk: int, coeff: float) -> Tensor:
    """Switch/GShard balancing loss: `coeff * E * sum_e f_e * P_e` with `f_e` the fraction of
    the `T * k` selections that chose expert e and `P_e` the mean score of e over the tokens.

    `scores [T, E]`, `tokens_per_expert [E]` -> a scalar (minimal when the load is uniform).
    """
    tokens, experts = scores.shape
    fraction = tokens_per_expert.to(scores.dtype) / (tokens * topk)  # [E]
    mean_score = scores.mean(dim=0)  # [E]
    return coeff * experts * torch.sum(fraction * mean_score)


def z_loss(logits: Tensor, coeff: float) -> Tensor:
    """ST-MoE router z-loss: `coeff * mean_t logsumexp(logits_t)^2`, keeping logits small."""
    return coeff * torch.logsumexp(logits, dim=-1).square().mean()


def expert_capacity(num_tokens: int, config: TransformerConfig) -> int:
    """Rows each expert takes: `ceil(T * k / E * moe_expert_capacity_factor)`."""
    factor = config.moe_expert_capacity_factor
    assert factor is not None and config.num_moe_experts is not None
    return math.ceil(num_tokens * config.moe_router_topk / config.num_moe_experts * factor)


def apply_capacity(probs: Tensor, indices: Tensor, config: TransformerConfig) -> tuple[Tensor, Tensor]:
    """Drop (token, expert) pairs beyond each expert's capacity: their index becomes `E` (no
    expert) and their prob 0. Policy "probs" keeps each expert's highest-prob rows, "position"
    its earliest tokens. `probs, indices [T, k]` -> the same shapes."""
    experts = config.num_moe_experts
    assert experts is not None
    tokens = probs.shape[0]
    capacity = expert_capacity(tokens, config)
    if capacity >= tokens:
        return probs, indices
    routed = torch.zeros(tokens, experts, dtype=torch.bool, device=probs.device)
    routed.scatter_(1, indices, True)  # [T, E]
    if config.moe_token_drop_policy == "probs":
        dense = torch.zeros(tokens, experts, dtype=probs.dtype, device=probs.device)
        dense.scatter_(1, indices, probs.detach())
        keep_rows = dense.topk(capacity, dim=0, sorted=False).indices  # [C, E]
    else:  # "position": the first routed tokens (a stable sort puts them first)
        keep_rows = torch.sort(routed.to(torch.int8), dim=0, descending=True, stable=True).indices[:capacity]
    keep = torch.zeros_like(routed).scatter_(0, keep_rows, True) & routed  # [T, E]
    kept = keep.gather(1, indices)  # [T, k]
    return probs * kept, indices.masked_fill(~kept, experts)


def updated_expert_bias(expert_bias: Tensor, tokens_per_expert: Tensor, rate: float) -> Tensor:
    """Aux-loss-free balancing (DeepSeek-V3): raise the bias of under-loaded experts by
    `rate`, lower it for over-loaded ones (sign of mean load minus the expert's load)."""
    counts = tokens_per_expert.to(torch.float32)
    return expert_bias + torch.sign(counts.mean() - counts) * rate
