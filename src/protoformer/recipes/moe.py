"""Mixture-of-experts recipes: the `MoELayer` slots from a backend, and per-layer specs that
put MoE in the layers `config.moe_layer_freq` marks (dense elsewhere, e.g. DeepSeek's first
three layers)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from protoformer.backends.base import BackendSpecProvider
from protoformer.config import TransformerConfig
from protoformer.recipes.gpt import gpt_layer_spec, mlp_spec
from protoformer.recipes.layer_pattern import layer_specs_from_pattern
from protoformer.recipes.mla import mla_layer_spec
from protoformer.transformer.layer import TransformerLayerSubmodules
from protoformer.transformer.moe import (
    GroupedMLP,
    GroupedMLPSubmodules,
    MoELayer,
    MoESubmodules,
    SequentialMLP,
    SharedExpertMLP,
)
from protoformer.transformer.moe.protocols import ExpertsBuilder, SharedExpertsBuilder

__all__ = ["gpt_moe_layer_specs", "mla_moe_layer_specs", "moe_layer_specs", "moe_spec"]

DenseLayerRecipe = Callable[[BackendSpecProvider, TransformerConfig], TransformerLayerSubmodules]


def moe_spec(backend: BackendSpecProvider, config: TransformerConfig, *,
             grouped: bool = True) -> MoESubmodules:
    """The slots of `MoELayer`: the backend's router, grouped experts (`grouped=False`: one
    MLP per expert from the backend's column/row-parallel linears) and, when
    `config.moe_shared_expert_intermediate_size` is set, shared experts."""
    experts: ExpertsBuilder
    if grouped:
        experts = functools.partial(GroupedMLP, submodules=GroupedMLPSubmodules(
            linear_fc1=backend.grouped_linear(), linear_fc2=backend.grouped_linear(),
            activation=backend.expert_activation()))
    else:
        experts = functools.partial(SequentialMLP, submodules=mlp_spec(backend, config))
    shared: SharedExpertsBuilder | None = None
    if config.moe_shared_expert_intermediate_size is not None:
        shared = functools.partial(SharedExpertMLP, submodules=mlp_spec(backend, config))
    return MoESubmodules(router=backend.router(), experts=experts, shared_experts=shared)


def moe_layer_specs(backend: BackendSpecProvider, config: TransformerConfig,
                    dense: DenseLayerRecipe = gpt_layer_spec) -> list[TransformerLayerSubmodules]:
    """One spec per layer: `dense(backend, config)`, with its `mlp` slot replaced by an
    `MoELayer` in the layers of `config.moe_layer_pattern` (all dense without experts)."""
    dense_spec = dense(backend, config)
    if config.num_moe_experts is None:
        return [dense_spec] * config.num_layers
    moe = dataclasses.replace(dense_spec, mlp=functools.partial(
        MoELayer, submodules=moe_spec(backend, config)))
    return layer_specs_from_pattern(config.moe_layer_pattern, (dense_spec, moe))


def gpt_moe_layer_specs(backend: BackendSpecProvider,
                        config: TransformerConfig) -> list[TransformerLayerSubmodules]:
    """GPT/Llama layers with MoE MLPs per `config.moe_layer_freq` (Mixtral, Qwen-MoE, OLMoE)."""
    return moe_layer_specs(backend, config, gpt_layer_spec)


def mla_moe_layer_specs(backend: BackendSpecProvider,
                        config: TransformerConfig) -> list[TransformerLayerSubmodules]:
    """Multi-latent-attention layers with MoE MLPs per `config.moe_layer_freq` (DeepSeek-V3)."""
    return moe_layer_specs(backend, config, mla_layer_spec)
