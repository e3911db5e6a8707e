"""Builder/Interface protocols of the MoE slots: router, experts, shared experts, grouped
linears and the token dispatcher (names as at Megatron-Core's HEAD).

Tensor shapes: `T` tokens entering the layer (`s * b`), `k` = `moe_router_topk`, `E` experts,
`N` routed rows after dispatch (`T * k` when dropless, fewer when a capacity drops tokens),
grouped by expert: expert 0's rows first, then expert 1's, ...
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from protoformer.config import TransformerConfig
from protoformer.parallel.groups import ProcessGroups
from protoformer.parallel.protocols import InitMethod

__all__ = [
    "ExpertActivationBuilder",
    "ExpertActivationInterface",
    "ExpertsBuilder",
    "ExpertsInterface",
    "GroupedLinearBuilder",
    "GroupedLinearFc1Builder",
    "GroupedLinearFc2Builder",
    "GroupedLinearInterface",
    "RouterBuilder",
    "RouterInterface",
    "SharedExpertsBuilder",
    "SharedExpertsInterface",
    "TokenDispatcherBuilder",
    "TokenDispatcherInterface",
]


class RouterInterface(Protocol):
    """Scores `[T, h]` tokens against the experts and picks `k` per token.

    Returns `(probs [T, k], top_indices [T, k])`: the weight of each selected expert in the
    token's output and the expert's global index. An index equal to `num_moe_experts` marks a
    (token, slot) pair dropped by the capacity factor; its prob is 0.
    """

    def forward(self, input: Tensor, /) -> tuple[Tensor, Tensor]: ...


class RouterBuilder(Protocol):
    """Builds an MoE layer's router (`TopKRouter`)."""

    def __call__(self, *, config: TransformerConfig, pg: ProcessGroups | None) -> RouterInterface: ...


class ExpertsInterface(Protocol):
    """The routed experts of one rank, applied to dispatched rows.

    `dispatched_input [N, h]` grouped by local expert, `tokens_per_expert [E_local]` (int64, on
    the input's device: a grouped GEMM reads it without a host sync), `permuted_probs [N]` ->
    `(output [N, h], None)`: row `r` is `probs[r] * expert(dispatched_input[r])`, expert biases
    included in the scaling. The second element (a bias left unadded) is always None here.
    """

    def forward(
        self, dispatched_input: Tensor, tokens_per_expert: Tensor, permuted_probs: Tensor, /
    ) -> tuple[Tensor, Tensor | None]: ...


class ExpertsBuilder(Protocol):
    """Builds the routed experts held by this rank (`GroupedMLP`, `SequentialMLP`)."""

    def __call__(
        self, num_local_experts: int, config: TransformerConfig, /, *, pg: ProcessGroups | None
    ) -> ExpertsInterface: ...


class SharedExpertsInterface(Protocol):
    """Experts every token goes through: `[s, b, h]` -> `[s, b, h]` (gate applied, bias added)."""

    def forward(self, hidden_states: Tensor, /) -> Tensor: ...


class SharedExpertsBuilder(Protocol):
    """Builds the shared experts (`SharedExpertMLP`); `gate` adds Qwen2-MoE's sigmoid gate."""

    def __call__(
        self, *, config: TransformerConfig, pg: ProcessGroups | None, gate: bool
    ) -> SharedExpertsInterface: ...


class GroupedLinearInterface(Protocol):
    """One linear per local expert over rows grouped by expert.

    `[N, input_size]`, `tokens_per_expert [E_local]` -> (`[N, output_size]`, the per-row bias
    left unadded when built with `skip_bias_add`, else None).
    """

    def forward(self, input: Tensor, tokens_per_expert: Tensor, /) -> tuple[Tensor, Tensor | None]: ...


class GroupedLinearBuilder(Protocol):
    """Builds a grouped linear: `num_local_experts` weights `[output_size, input_size]` in one
    tensor `[E_local, output_size, input_size]` (the nn.Linear layout per expert)."""

    def __call__(
        self,
        num_local_experts: int,
        input_size: int,
        output_size: int,
        /,
        *,
        config: TransformerConfig,
        init_method: InitMethod,
        bias: bool,
        skip_bias_add: bool,
        is_expert: bool,
        tp_comm_buffer_name: str | None,
    ) -> GroupedLinearInterface: ...


GroupedLinearFc1Builder = GroupedLinearBuilder
"""The experts' first linear (gate and up halves when gated): the grouped linear kind."""

GroupedLinearFc2Builder = GroupedLinearBuilder
"""The experts' second linear: *the same* grouped linear kind (experts are not split over
tensor-parallel ranks, so fc1 and fc2 need no different splitting keyword)."""


class ExpertActivationInterface(Protocol):
    """The experts' nonlinearity times each row's routing weight.

    `[N, 2f]` (gate then up) or `[N, f]`, `probs [N]` -> `[N, f]`: `act(gate) * up * prob`
    (gated) or `act(x) * prob`. One kind so a backend can fuse the three passes into one.
    """

    def forward(self, x: Tensor, probs: Tensor, /) -> Tensor: ...


class ExpertActivationBuilder(Protocol):
    """Builds the experts' activation from the config (`activation_func`, `gated`)."""

    def __call__(self, config: TransformerConfig, /, *, gated: bool) -> ExpertActivationInterface: ...


class TokenDispatcherInterface(Protocol):
    """Moves routed tokens to the rank and rows of their experts, and back.

    `dispatch(hidden_states [T, h], probs [T, k], top_indices [T, k])` ->
    `(dispatched_input [N, h], tokens_per_expert [E_local], permuted_probs [N])` grouped by
    local expert; `combine(expert_output [N, h])` -> `[T, h]`, each token's rows summed. The
    dispatcher keeps what `combine` needs from the last `dispatch` (one in flight at a time).
    The local dispatcher permutes on one rank; an expert-parallel one adds all-to-alls.
    """

    def dispatch(
        self, hidden_states: Tensor, probs: Tensor, top_indices: Tensor, /
    ) -> tuple[Tensor, Tensor, Tensor]: ...

    def combine(self, expert_output: Tensor, /) -> Tensor: ...


class TokenDispatcherBuilder(Protocol):
    """Builds the dispatcher for `num_local_experts` experts starting at global index
    `local_expert_offset` (0 on one rank)."""

    def __call__(
        self,
        num_local_experts: int,
        local_expert_offset: int,
        /,
        *,
        config: TransformerConfig,
        pg: ProcessGroups | None,
    ) -> TokenDispatcherInterface: ...
