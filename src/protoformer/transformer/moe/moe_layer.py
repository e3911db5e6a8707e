"""`MoELayer`: a mixture-of-experts block that fills a transformer layer's `mlp` slot."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from protoformer.config import TransformerConfig
from protoformer.parallel.grads import mark_expert_parallel
from protoformer.parallel.groups import ProcessGroups
from protoformer.spec import Submodules, apply_module
from protoformer.transformer.moe.alltoall_dispatcher import MoEAlltoAllTokenDispatcher
from protoformer.transformer.moe.dispatcher import MoELocalTokenDispatcher
from protoformer.transformer.moe.protocols import (
    ExpertsBuilder,
    RouterBuilder,
    SharedExpertsBuilder,
    TokenDispatcherBuilder,
)

__all__ = ["MoELayer", "MoESubmodules"]


@dataclass
class MoESubmodules(Submodules):
    """The slots of `MoELayer`. `token_dispatcher=None` picks the local (one-rank) dispatcher,
    or `MoEAlltoAllTokenDispatcher` under expert parallelism."""

    router: RouterBuilder
    experts: ExpertsBuilder
    shared_experts: SharedExpertsBuilder | None = None
    token_dispatcher: TokenDispatcherBuilder | None = None


@contextlib.contextmanager
def _expert_rng(ep_rank: int, ep_size: int) -> Generator[None, None, None]:
    """Under expert parallelism, initialise this EP rank's experts from their own stream.

    Every rank builds the model from the same seed (so replicated weights agree); without
    this, EP rank 1's experts would repeat rank 0's. The stream is derived from the seed and
    the EP rank (equal on the replicas holding the same experts), and the default generators
    are restored afterwards, so the rest of the model is initialised as on every rank.
    """
    if ep_size == 1:
        yield
        return
    with _fork_rng():
        _manual_seed(torch.initial_seed() + _EXPERT_SEED_STRIDE * (ep_rank + 1))
        yield


_EXPERT_SEED_STRIDE = 1_000_003
# torch leaves these unannotated; this is how they are called here.
_fork_rng = cast("Callable[[], contextlib.AbstractContextManager[object]]",
                 torch.random.fork_rng)  # pyright: ignore[reportUnknownMemberType]
_manual_seed = cast("Callable[[int], object]", torch.manual_seed)  # pyright: ignore[reportUnknownMemberType]


class MoELayer(nn.Module):
    """Route each token to `moe_router_topk` of `num_moe_experts` experts and sum their
    prob-weighted outputs, plus the shared experts when there are any.

    Same Builder/Interface as `MLP` (`partial(MoELayer, submodules=MoESubmodules(...))` in a
    layer's `mlp` slot): `[s, b, h]` -> (`[s, b, h]`, None). Steps: `router` (probs, indices),
    `token_dispatcher.dispatch` (rows grouped by expert), `experts`, `token_dispatcher.combine`.
    """

    def __init__(self, config: TransformerConfig, submodules: MoESubmodules, *,
                 pg: ProcessGroups | None = None) -> None:
        super().__init__()
        if not isinstance(submodules, MoESubmodules):  # pyright: ignore[reportUnnecessaryIsInstance]  # user input
            raise TypeError(f"MoELayer expects submodules=MoESubmodules(...), got "
                            f"{type(submodules).__qualname__}")
        experts = config.num_moe_experts
        if experts is None:
            raise ValueError("MoELayer needs config.num_moe_experts (this config is dense); set "
                             "it, or put a dense MLP in this layer's mlp slot")
        shared_size = config.moe_shared_expert_intermediate_size
        if (shared_size is None) != (submodules.shared_experts is None):
            raise ValueError(
                f"MoELayer: config.moe_shared_expert_intermediate_size={shared_size} but "
                f"MoESubmodules.shared_experts is {'None' if submodules.shared_experts is None else 'set'}; "
                "give both (shared experts) or neither")
        self.config = config
        self.input_size: int = config.hidden_size  # MLPInterface: the width the layer reads
        groups = pg if pg is not None else ProcessGroups()
        ep_size = config.expert_model_parallel_size
        if groups.ep_size != ep_size:
            raise ValueError(
                f"MoELayer: config.expert_model_parallel_size={ep_size} but the expert-parallel "
                f"group has {groups.ep_size} rank(s); build the groups with "
                f"ProcessGroups.from_torchrun(ep={ep_size}) (or set the config to match)")
        self.num_local_experts = experts // ep_size
        # This rank holds experts local_offset .. local_offset + num_local_experts - 1.
        self.local_expert_offset = groups.ep_rank * self.num_local_experts
        self.router = submodules.router(config=config, pg=pg)
        with _expert_rng(groups.ep_rank, ep_size):
            self.experts = submodules.experts(self.num_local_experts, config, pg=pg)
        if isinstance(self.experts, nn.Module):  # the experts' parameters live here
            mark_expert_parallel(self.experts)
        self.shared_experts = None if submodules.shared_experts is None else \
            submodules.shared_experts(config=config, pg=pg, gate=config.moe_shared_expert_gate)
        dispatcher = submodules.token_dispatcher or (
            MoEAlltoAllTokenDispatcher if ep_size > 1 else MoELocalTokenDispatcher)
        self.token_dispatcher = dispatcher(self.num_local_experts, self.local_expert_offset,
                                           config=config, pg=pg)

    def forward(self, hidden_states: Tensor, /) -> tuple[Tensor, Tensor | None]:
        """`[s, b, h]` -> (`[s, b, h]`, None)."""
        shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, shape[-1])  # [T, h]
        probs, top_indices = apply_module(self.router)(tokens)  # [T, k] each
        rows, tokens_per_expert, row_probs = self.token_dispatcher.dispatch(tokens, probs, top_indices)
        expert_output, _ = apply_module(self.experts)(rows, tokens_per_expert, row_probs)  # [N, h]
        output = self.token_dispatcher.combine(expert_output).view(shape)  # [s, b, h]
        if self.shared_experts is not None:
            output = output + apply_module(self.shared_experts)(hidden_states)
        return output, None
