"""The stable import paths of DESIGN.md section 4: every listed name imports from its module."""

from __future__ import annotations

import importlib

import pytest

PUBLIC_API = {
    "protoformer": ["TransformerConfig", "MLATransformerConfig", "__version__"],
    "protoformer.spec": ["SpecError", "check_builder", "apply_module", "not_none"],
    "protoformer.parallel": ["ProcessGroups", "ColumnParallelLinear", "RowParallelLinear",
                             "VocabParallelEmbedding"],
    "protoformer.transformer.attention": [
        "Attention", "SelfAttention", "SelfAttentionSubmodules", "CrossAttention",
        "CrossAttentionSubmodules", "LinearQkvBuilder", "LinearQkvInterface",
        "LinearLayerBuilder", "LinearInterface", "CoreAttentionBuilder",
        "CoreAttentionInterface", "LinearProjBuilder", "LinearProjInterface"],
    "protoformer.transformer.mla": ["MultiLatentAttention", "MLASelfAttentionSubmodules"],
    "protoformer.transformer.mlp": ["MLP", "MLPSubmodules", "LinearFc1Builder", "LinearFc2Builder"],
    "protoformer.transformer.norm": ["LayerNormBuilder", "LayerNormInterface"],
    "protoformer.transformer.layer": ["TransformerLayer", "TransformerLayerSubmodules"],
    "protoformer.transformer.enums": ["AttnMaskType"],
    "protoformer.backends": ["BackendSpecProvider", "LocalSpecProvider", "get_backend"],
    "protoformer.transformer.block": ["TransformerBlock", "LayerSpecs", "per_layer_specs"],
    "protoformer.recipes": ["gpt_layer_spec", "mla_layer_spec", "layer_pattern_from_freq",
                            "layer_specs_from_pattern"],
    "protoformer.models": ["GPTModel"],
}


@pytest.mark.parametrize("module_name", sorted(PUBLIC_API))
def test_public_names_import(module_name: str) -> None:
    module = importlib.import_module(module_name)
    missing = [name for name in PUBLIC_API[module_name] if not hasattr(module, name)]
    assert not missing, f"{module_name} lacks {missing}"


def test_slot_aliases_are_the_general_layer_protocols() -> None:
    from protoformer.parallel.protocols import (
        ColumnParallelLinearBuilder,
        RowParallelLinearBuilder,
    )
    from protoformer.transformer import attention, mlp

    # One protocol per general layer kind; slot names are aliases of it.
    assert attention.LinearProjBuilder is RowParallelLinearBuilder
    assert mlp.LinearFc2Builder is RowParallelLinearBuilder
    assert attention.LinearQkvBuilder is ColumnParallelLinearBuilder
    assert attention.LinearLayerBuilder is ColumnParallelLinearBuilder
    assert mlp.LinearFc1Builder is ColumnParallelLinearBuilder


def test_backend_methods_return_builder_protocols_never_bare_type() -> None:
    import typing

    from protoformer.backends import BackendSpecProvider

    for name in ("column_parallel_linear", "row_parallel_linear", "linear", "layer_norm",
                 "core_attention", "activation"):
        returned = typing.get_type_hints(getattr(BackendSpecProvider, name))["return"]
        assert returned is not type
        assert getattr(returned, "_is_protocol", False), f"{name} returns {returned}"
        assert "__call__" in vars(returned), f"{name} returns a non-builder protocol"
