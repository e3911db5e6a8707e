"""Named model presets: a config, a layer recipe and the model-level sizes, ready to build.

`get_preset("tiny").build_model()` gives a byte-level Llama-like model small enough to train
on a laptop CPU; the real-shape presets (`llama3-8b`, `llama3-70b`, `deepseek-v3-mla`) are for
inspection (`build_model(device="meta")` allocates nothing), FLOP counts and weight loading.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from protoformer.backends import BackendSpecProvider, get_backend
from protoformer.config import MLATransformerConfig, TransformerConfig
from protoformer.models.gpt import GPTModel
from protoformer.parallel.groups import ProcessGroups
from protoformer.recipes.gpt import gpt_layer_spec
from protoformer.recipes.mla import mla_layer_spec
from protoformer.transformer.layer import TransformerLayerSubmodules

__all__ = ["Preset", "get_preset", "list_presets"]

LayerSpecRecipe = Callable[[BackendSpecProvider, TransformerConfig], TransformerLayerSubmodules]


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
        layer_spec: TransformerLayerSubmodules | None = None,
    ) -> GPTModel:
        """Build the model with `backend` (default: the `"local"` backend), on `device` if given.

        `device="meta"` builds every parameter without storage, to inspect shapes and count
        parameters of models that do not fit in memory. `layer_spec` replaces the preset's own
        recipe (a spec loaded from a file, or one with overrides applied).
        """
        backend = backend if backend is not None else get_backend("local")
        config = self.config()
        spec = layer_spec if layer_spec is not None else self.layer_spec(backend, config)
        placement = torch.device(device) if device is not None else contextlib.nullcontext()
        with placement:
            return GPTModel(
                config,
                spec,
                self.vocab_size,
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
    return TransformerConfig(
        num_layers=4,
        hidden_size=128,
        num_attention_heads=8,
        num_query_groups=2,
        ffn_hidden_size=384,
        normalization="RMSNorm",
        qk_layernorm=True,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        attention_dropout=0.0,
        hidden_dropout=0.0,
    )


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


def _llama3(*, num_layers: int, hidden_size: int, num_attention_heads: int,
            ffn_hidden_size: int) -> TransformerConfig:
    # Llama 3.1 shapes: GQA with 8 key/value heads, SwiGLU, RMSNorm, no biases, RoPE with
    # base 500000 and the llama3 frequency scaling (factor 8 over an 8192-token original).
    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        num_query_groups=8,
        ffn_hidden_size=ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=1e-5,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        rotary_base=500000.0,
        rope_scaling="llama3",
        rope_scaling_factor=8.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_original_max_position_embeddings=8192,
        params_dtype=torch.bfloat16,
        bf16=True,
    )


def _llama3_8b() -> TransformerConfig:
    return _llama3(num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=14336)


def _llama3_70b() -> TransformerConfig:
    return _llama3(num_layers=80, hidden_size=8192, num_attention_heads=64, ffn_hidden_size=28672)


def _deepseek_v3_mla() -> TransformerConfig:
    # DeepSeek-V3's attention and sizes with a dense SwiGLU MLP in every layer (the released
    # model uses mixture-of-experts MLPs in all but its first three layers).
    return MLATransformerConfig(
        num_layers=61,
        hidden_size=7168,
        num_attention_heads=128,
        ffn_hidden_size=18432,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_head_dim=128,
        qk_pos_emb_head_dim=64,
        v_head_dim=128,
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        rotary_base=10000.0,
        rope_type="yarn",
        rotary_scaling_factor=40.0,
        original_max_position_embeddings=4096,
        beta_fast=32.0,
        beta_slow=1.0,
        mscale=1.0,
        mscale_all_dim=1.0,
        params_dtype=torch.bfloat16,
        bf16=True,
    )


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
        Preset("llama3-8b", "Llama 3.1 8B shapes (32 layers, hidden 4096, GQA 32/8, SwiGLU "
               "14336, vocab 128256, llama3 RoPE scaling)", _llama3_8b, vocab_size=128256,
               max_sequence_length=131072, layer_spec=gpt_layer_spec, tie_embeddings=False),
        Preset("llama3-70b", "Llama 3.1 70B shapes (80 layers, hidden 8192, GQA 64/8, SwiGLU "
               "28672, vocab 128256, llama3 RoPE scaling)", _llama3_70b, vocab_size=128256,
               max_sequence_length=131072, layer_spec=gpt_layer_spec, tie_embeddings=False),
        Preset("deepseek-v3-mla", "DeepSeek-V3 attention shapes (61 layers, hidden 7168, MLA "
               "with 128 heads, YaRN RoPE) with dense SwiGLU MLPs of 18432", _deepseek_v3_mla,
               vocab_size=129280, max_sequence_length=163840, layer_spec=mla_layer_spec,
               tie_embeddings=False),
    )
}


def list_presets() -> list[str]:
    """The names `get_preset` accepts."""
    return list(_PRESETS)


def get_preset(name: str) -> Preset:
    """The preset called `name`; `ValueError` listing the known names otherwise."""
    preset = _PRESETS.get(name)
    if preset is None:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(_PRESETS)}")
    return preset
