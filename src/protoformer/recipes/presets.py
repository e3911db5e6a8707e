"""Named model presets: a config, a layer recipe and the model-level sizes, ready to build.

`get_preset("tiny").build_model()` gives a byte-level Llama-like model small enough to train
on a laptop CPU; the real-shape presets, registered by their families in
`protoformer.architectures` (`llama3-8b`, `llama3-70b`, `deepseek-v3-mla`, ...), are for
inspection (`build_model(device="meta")` allocates nothing), FLOP counts and weight loading.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from protoformer.backends import BackendSpecProvider, get_backend
from protoformer.config import MLATransformerConfig, TransformerConfig
from protoformer.models.gpt import GPTModel
from protoformer.parallel.groups import ProcessGroups
from protoformer.recipes.gpt import gpt_layer_spec
from protoformer.recipes.mla import mla_layer_spec
from protoformer.recipes.moe import gpt_moe_layer_specs
from protoformer.transformer.block import LayerSpecs

__all__ = ["Preset", "get_preset", "list_presets", "register_preset"]

# One spec for every layer, or a list with one per layer (e.g. dense layers, then MoE).
LayerSpecRecipe = Callable[[BackendSpecProvider, TransformerConfig], LayerSpecs]


@dataclass(frozen=True)
class Preset:
    """A named model: how to make its config and layer spec, and its vocabulary and context sizes."""

    name: str
    description: str
    config_factory: Callable[[], TransformerConfig]
    vocab_size: int
    max_sequence_length: int
    layer_spec: LayerSpecRecipe
    tie_embeddings: bool

    def config(self) -> TransformerConfig:
        """A fresh config (the factory runs each time, so callers may edit their copy)."""
        return self.config_factory()

    def build_model(
        self,
        backend: BackendSpecProvider | None = None,
        *,
        device: torch.device | str | None = None,
        pg: ProcessGroups | None = None,
        layer_spec: LayerSpecs | None = None,
        vocab_size: int | None = None,
    ) -> GPTModel:
        """Build the model with `backend` (default: the `"local"` backend), on `device` if given.

        `device="meta"` builds every parameter without storage, to inspect shapes and count
        parameters of models that do not fit in memory. `layer_spec` replaces the preset's own
        recipe (a spec loaded from a file, or one with overrides applied; one spec or a list with
        one per layer). `vocab_size` replaces the preset's (a run with its own tokenizer).
        """
        backend = backend if backend is not None else get_backend("local")
        config = self.config()
        spec = layer_spec if layer_spec is not None else self.layer_spec(backend, config)
        placement = torch.device(device) if device is not None else contextlib.nullcontext()
        with placement:
            return GPTModel(
                config,
                spec,
                self.vocab_size if vocab_size is None else vocab_size,
                self.max_sequence_length,
                pg=pg,
                share_embeddings_and_output_weights=self.tie_embeddings,
            )


def _tiny() -> TransformerConfig:
    return TransformerConfig(
        num_layers=4,
        hidden_size=128,
        num_attention_heads=4,
        ffn_hidden_size=384,
        normalization="RMSNorm",
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        attention_dropout=0.0,
        hidden_dropout=0.0,
    )


def _tiny_gqa() -> TransformerConfig:
    # kv_channels=None: the head size is derived again from the new head count (128 / 8).
    return replace(_tiny(), num_attention_heads=8, num_query_groups=2, kv_channels=None,
                   qk_layernorm=True)


def _tiny_mla() -> TransformerConfig:
    return MLATransformerConfig(
        num_layers=4,
        hidden_size=128,
        num_attention_heads=4,
        ffn_hidden_size=384,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_head_dim=32,
        qk_pos_emb_head_dim=16,
        v_head_dim=32,
        rope_type="rope",
        normalization="RMSNorm",
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        attention_dropout=0.0,
        hidden_dropout=0.0,
    )


def _tiny_moe() -> TransformerConfig:
    return replace(_tiny(), num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=128,
                   moe_layer_freq=[0, 1, 1, 1], moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3)


_PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset("tiny", "byte-level Llama-like model (4 layers, hidden 128, RMSNorm, SwiGLU, "
               "RoPE) that trains on a laptop CPU in minutes",
               _tiny, vocab_size=256, max_sequence_length=256, layer_spec=gpt_layer_spec,
               tie_embeddings=False),
        Preset("tiny-gqa", "tiny with grouped-query attention (8 heads, 2 key/value groups) and "
               "per-head query/key RMSNorm", _tiny_gqa, vocab_size=256, max_sequence_length=256,
               layer_spec=gpt_layer_spec, tie_embeddings=False),
        Preset("tiny-mla", "tiny with DeepSeek-style multi-latent attention (compressed "
               "query and key/value latents, decoupled rotary part)", _tiny_mla,
               vocab_size=256, max_sequence_length=256, layer_spec=mla_layer_spec,
               tie_embeddings=False),
        Preset("tiny-moe", "tiny with mixture-of-experts MLPs in layers 1-3 (8 experts of 128, "
               "top-2, load-balancing and z losses) that trains on a laptop CPU", _tiny_moe,
               vocab_size=256, max_sequence_length=256, layer_spec=gpt_moe_layer_specs,
               tie_embeddings=False),
        Preset("tiny-tied", "tiny with the output layer tied to the token embedding (as "
               "Llama 3.2 1B and Gemma)", _tiny, vocab_size=256, max_sequence_length=256,
               layer_spec=gpt_layer_spec, tie_embeddings=True),
    )
}


def register_preset(preset: Preset) -> None:
    """Add `preset` under its name (a family module registers the published sizes it builds)."""
    if preset.name in _PRESETS:
        raise ValueError(f"preset {preset.name!r} is already registered")
    _PRESETS[preset.name] = preset


def _load_family_presets() -> None:
    # The families (protoformer.architectures) register their published-size presets when
    # imported; they sit above the recipes in the layering, so they are imported on first use.
    importlib.import_module("protoformer.architectures")
    importlib.import_module("protoformer.recipes.moe_presets")


def list_presets() -> list[str]:
    """The names `get_preset` accepts: the tiny presets, then each family's published sizes."""
    _load_family_presets()
    return list(_PRESETS)


def get_preset(name: str) -> Preset:
    """The preset called `name`; `ValueError` listing the known names otherwise."""
    _load_family_presets()
    preset = _PRESETS.get(name)
    if preset is None:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(_PRESETS)}")
    return preset
