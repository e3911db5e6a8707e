"""`TopKRouter`: scores tokens against the experts and picks `moe_router_topk` of them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from protoformer.config import TransformerConfig
from protoformer.initialization import init_method_normal
from protoformer.parallel.groups import ProcessGroup, ProcessGroups
from protoformer.parallel.mappings import all_reduce_in_place
from protoformer.transformer.moe.aux_loss import MoEAuxLossTracker
from protoformer.transformer.moe.dispatcher import expert_counts
from protoformer.transformer.moe.routing import (
    apply_capacity,
    load_balancing_loss,
    scores_for_aux_loss,
    topk_routing,
    updated_expert_bias,
    z_loss,
)

__all__ = ["TopKRouter"]

_ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


class TopKRouter(nn.Module):
    """Linear gate `weight [E, h]` + top-k selection (`config.moe_router_*`).

    Softmax or sigmoid scores, pre-softmax, group-limited top-k, a top-k scaling factor and,
    with `moe_router_enable_expert_bias`, DeepSeek-V3's aux-loss-free `expert_bias` (a buffer
    moved by `update_expert_bias` once per optimizer step from the token counts of the
    training forwards since the last update). In training it records the load-balancing loss
    (`moe_aux_loss_coeff > 0`) and the z-loss (`moe_z_loss_coeff`) into the tracker its
    model gives it, and returns its probs through `tracker.attach` (which, under pipeline
    parallelism, carries those losses' gradients in the probs' backward). A capacity factor
    drops tokens after the aux losses are taken.
    """

    expert_bias: Tensor | None
    local_tokens_per_expert: Tensor | None

    def __init__(self, *, config: TransformerConfig, pg: ProcessGroups | None = None) -> None:
        super().__init__()
        del pg  # the router is replicated: every rank scores its own tokens
        experts = config.num_moe_experts
        if experts is None:
            raise ValueError("TopKRouter needs config.num_moe_experts; this config is dense")
        self.config = config
        self.num_experts = experts
        self.weight = nn.Parameter(torch.empty(experts, config.hidden_size, dtype=config.params_dtype))
        if config.perform_initialization and not self.weight.is_meta:  # meta: shapes only
            init_method_normal(config.init_method_std)(self.weight)
        self.router_dtype = _ROUTER_DTYPES.get(config.moe_router_dtype or "", None)
        if config.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(experts, dtype=torch.float32))
            self.register_buffer("local_tokens_per_expert", torch.zeros(experts, dtype=torch.float32),
                                 persistent=False)
        else:
            self.expert_bias = None
            self.local_tokens_per_expert = None
        self._aux_loss_tracker: MoEAuxLossTracker | None = None

    def set_aux_loss_tracker(self, tracker: MoEAuxLossTracker | None, /) -> None:
        """Record auxiliary losses into `tracker` (the model's) from now on."""
        self._aux_loss_tracker = tracker

    def forward(self, input: Tensor, /) -> tuple[Tensor, Tensor]:
        """`[T, h]` -> `(probs [T, k]` in the input's dtype, `top_indices [T, k])`."""
        dtype = self.router_dtype or input.dtype
        logits = torch.nn.functional.linear(input.to(dtype), self.weight.to(dtype))  # [T, E]
        scoring = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        probs, indices = topk_routing(scoring, self.config, self.expert_bias)  # [T, k] each
        tracker = self._aux_loss_tracker
        if self.training and torch.is_grad_enabled() and not (tracker is not None
                                                               and tracker.paused):
            self._account(scoring, indices)
        if self.config.moe_expert_capacity_factor is not None:
            probs, indices = apply_capacity(probs, indices, self.config)
        probs = probs.to(input.dtype)
        # Under pipeline parallelism the losses just recorded ride on the probs' backward.
        return (probs if tracker is None else tracker.attach(probs)), indices

    def _account(self, logits: Tensor, indices: Tensor) -> None:
        counts = expert_counts(indices, self.num_experts)  # [E]
        if self.local_tokens_per_expert is not None:
            self.local_tokens_per_expert += counts.to(torch.float32)
        tracker = self._aux_loss_tracker
        if tracker is None:
            return
        if self.config.moe_aux_loss_coeff > 0:
            scores = scores_for_aux_loss(logits, self.config)
            tracker.record("load_balancing_loss", load_balancing_loss(
                scores, counts, self.config.moe_router_topk, self.config.moe_aux_loss_coeff))
        if self.config.moe_z_loss_coeff:
            tracker.record("z_loss", z_loss(logits, self.config.moe_z_loss_coeff))

    @torch.no_grad()
    def update_expert_bias(self, groups: Sequence[ProcessGroup | None], /) -> None:
        """Move `expert_bias` by the token counts since the last call (summed over `groups`,
        the ranks that see different tokens) and reset the counts. No-op without a bias."""
        if self.expert_bias is None or self.local_tokens_per_expert is None:
            return
        counts = self.local_tokens_per_expert
        for group in groups:
            all_reduce_in_place(counts, group)
        if counts.sum() > 0:
            self.expert_bias.copy_(updated_expert_bias(
                self.expert_bias, counts, self.config.moe_router_bias_update_rate))
        counts.zero_()

    def extra_repr(self) -> str:
        config = self.config
        return (f"experts={self.num_experts}, topk={config.moe_router_topk}, "
                f"score={config.moe_router_score_function}, "
                f"expert_bias={self.expert_bias is not None}")
