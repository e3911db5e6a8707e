"""`SharedExpertMLP`: the experts every token goes through (DeepSeek, Qwen2-MoE), optionally
scaled per token by a sigmoid gate (Qwen2-MoE's `shared_expert_gate`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from protoformer.config import TransformerConfig
from protoformer.initialization import init_method_normal
from protoformer.parallel.groups import ProcessGroups
from protoformer.transformer.mlp import MLP, MLPSubmodules

__all__ = ["SharedExpertMLP"]


class SharedExpertMLP(MLP):
    """An `MLP` of width `moe_shared_expert_intermediate_size` (all shared experts as one),
    split over tensor-parallel ranks like the dense MLP. With `gate`, the output is scaled by
    `sigmoid(x @ gate_weight.T)` (`gate_weight [1, h]`)."""

    gate_weight: nn.Parameter | None

    def __init__(self, *, config: TransformerConfig, pg: ProcessGroups | None = None,
                 gate: bool, submodules: MLPSubmodules) -> None:
        size = config.moe_shared_expert_intermediate_size
        if size is None:
            raise ValueError("SharedExpertMLP needs config.moe_shared_expert_intermediate_size "
                             "(the shared experts' total width)")
        super().__init__(config, submodules, pg=pg, ffn_hidden_size=size)
        if gate:
            self.gate_weight = nn.Parameter(torch.empty(1, config.hidden_size, dtype=config.params_dtype))
            if config.perform_initialization and not self.gate_weight.is_meta:
                init_method_normal(config.init_method_std)(self.gate_weight)
        else:
            self.gate_weight = None

    def forward(self, hidden_states: Tensor, /) -> Tensor:  # type: ignore[override]  # the shared-experts interface returns one tensor
        """`[s, b, h]` -> `[s, b, h]` (bias added, gate applied)."""
        output, bias = super().forward(hidden_states)
        if bias is not None:
            output = output + bias
        if self.gate_weight is not None:
            gate = torch.sigmoid(torch.nn.functional.linear(hidden_states, self.gate_weight))  # [s, b, 1]
            output = output * gate
        return output
