"""Mixture of experts: `MoELayer` (fills a layer's `mlp` slot), its typed slots
(`MoESubmodules`: router, experts, shared experts, token dispatcher), `TopKRouter`,
`GroupedMLP` / `SequentialMLP` experts, `SharedExpertMLP`, and the auxiliary-loss channel."""

from protoformer.transformer.moe.alltoall_dispatcher import MoEAlltoAllTokenDispatcher
from protoformer.transformer.moe.aux_loss import (
    AuxLossReporter,
    ExpertBiasOwner,
    MoEAuxLossAutoScaler,
    MoEAuxLossTracker,
    bind_aux_loss_tracker,
    update_expert_biases,
)
from protoformer.transformer.moe.dispatcher import MoELocalTokenDispatcher
from protoformer.transformer.moe.experts import (
    ExpertActivation,
    GroupedLinear,
    GroupedMLP,
    GroupedMLPSubmodules,
    SequentialMLP,
)
from protoformer.transformer.moe.moe_layer import MoELayer, MoESubmodules
from protoformer.transformer.moe.protocols import (
    ExpertActivationBuilder,
    ExpertActivationInterface,
    ExpertsBuilder,
    ExpertsInterface,
    GroupedLinearBuilder,
    GroupedLinearFc1Builder,
    GroupedLinearFc2Builder,
    GroupedLinearInterface,
    RouterBuilder,
    RouterInterface,
    SharedExpertsBuilder,
    SharedExpertsInterface,
    TokenDispatcherBuilder,
    TokenDispatcherInterface,
)
from protoformer.transformer.moe.router import TopKRouter
from protoformer.transformer.moe.shared_experts import SharedExpertMLP

__all__ = [
    "AuxLossReporter",
    "ExpertActivation",
    "ExpertActivationBuilder",
    "ExpertActivationInterface",
    "ExpertBiasOwner",
    "ExpertsBuilder",
    "ExpertsInterface",
    "GroupedLinear",
    "GroupedLinearBuilder",
    "GroupedLinearFc1Builder",
    "GroupedLinearFc2Builder",
    "GroupedLinearInterface",
    "GroupedMLP",
    "GroupedMLPSubmodules",
    "MoEAlltoAllTokenDispatcher",
    "MoEAuxLossAutoScaler",
    "MoEAuxLossTracker",
    "MoELayer",
    "MoELocalTokenDispatcher",
    "MoESubmodules",
    "RouterBuilder",
    "RouterInterface",
    "SequentialMLP",
    "SharedExpertMLP",
    "SharedExpertsBuilder",
    "SharedExpertsInterface",
    "TokenDispatcherBuilder",
    "TokenDispatcherInterface",
    "TopKRouter",
    "bind_aux_loss_tracker",
    "update_expert_biases",
]
