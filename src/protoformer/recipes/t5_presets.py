"""Named encoder-decoder presets: the shapes of published T5 models, built as `T5Model`.

For inspection (`protoformer inspect t5-base`: both layer specs, parameter counts, built on the
meta device) and as a starting point for your own configs; weights come from `t5_from_hf`.
`protoformer train` trains decoder-only presets only.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from protoformer.backends import BackendSpecProvider, get_backend
from protoformer.config import TransformerConfig
from protoformer.models.t5 import T5Model
from protoformer.recipes.t5 import t5_decoder_layer_spec, t5_encoder_layer_spec
from protoformer.transformer.layer import TransformerLayerSubmodules
from protoformer.transformer.mlp import gelu_tanh

__all__ = ["T5Preset", "get_t5_preset", "list_t5_presets", "register_t5_preset"]


@dataclass(frozen=True)
class T5Preset:
    """A named encoder-decoder model: its config (both stacks alike but for depth) and sizes."""

    name: str
    description: str
    config_factory: Callable[[int], TransformerConfig]  # num_layers -> config of one stack
    encoder_layers: int
    decoder_layers: int
    vocab_size: int
    max_sequence_length: int
    tie_embeddings: bool  # original T5: tied and scaled; v1.1: untied, unscaled

    def configs(self) -> tuple[TransformerConfig, TransformerConfig]:
        """Fresh (decoder config, encoder config)."""
        return self.config_factory(self.decoder_layers), self.config_factory(self.encoder_layers)

    def layer_specs(self, backend: BackendSpecProvider
                    ) -> tuple[TransformerLayerSubmodules, TransformerLayerSubmodules]:
        """(encoder layer spec, decoder layer spec) from `backend`."""
        config, encoder_config = self.configs()
        return t5_encoder_layer_spec(backend, encoder_config), t5_decoder_layer_spec(backend, config)

    def build_model(self, backend: BackendSpecProvider | None = None, *,
                    device: torch.device | str | None = None,
                    layer_specs: tuple[TransformerLayerSubmodules, TransformerLayerSubmodules]
                    | None = None) -> T5Model:
        """Build the model (default backend `"local"`); `device="meta"` allocates nothing.

        `layer_specs` (encoder, decoder) replaces the preset's recipes."""
        backend = backend if backend is not None else get_backend("local")
        config, encoder_config = self.configs()
        encoder_spec, decoder_spec = (layer_specs if layer_specs is not None
                                      else self.layer_specs(backend))
        placement = torch.device(device) if device is not None else contextlib.nullcontext()
        with placement:
            return T5Model(config, encoder_spec, decoder_spec, self.vocab_size,
                           self.max_sequence_length, encoder_config=encoder_config,
                           share_embeddings_and_output_weights=self.tie_embeddings,
                           scale_decoder_outputs=self.tie_embeddings)


def _t5(*, hidden: int, heads: int, ffn: int, gated: bool) -> Callable[[int], TransformerConfig]:
    def config(num_layers: int) -> TransformerConfig:
        return TransformerConfig(
            num_layers=num_layers, hidden_size=hidden, num_attention_heads=heads, kv_channels=64,
            ffn_hidden_size=ffn, normalization="RMSNorm", layernorm_epsilon=1e-6,
            add_bias_linear=False, gated_linear_unit=gated,
            activation_func=gelu_tanh if gated else F.relu, softmax_scale=1.0,
            attention_dropout=0.1, hidden_dropout=0.1)
    return config


_PRESETS: dict[str, T5Preset] = {
    preset.name: preset
    for preset in (
        T5Preset("t5-small", "T5 small (6 + 6 layers, d_model 512, 8 heads of 64, ReLU MLP 2048, "
                 "relative position bias, tied and scaled head)",
                 _t5(hidden=512, heads=8, ffn=2048, gated=False), 6, 6, 32128, 512, True),
        T5Preset("t5-base", "T5 base (12 + 12 layers, d_model 768, 12 heads of 64, ReLU MLP "
                 "3072)", _t5(hidden=768, heads=12, ffn=3072, gated=False), 12, 12, 32128, 512,
                 True),
        T5Preset("t5-v1_1-xl", "T5 v1.1 / Flan-T5 XL (24 + 24 layers, d_model 2048, 32 heads of "
                 "64, gated-GeLU MLP 5120, untied head)",
                 _t5(hidden=2048, heads=32, ffn=5120, gated=True), 24, 24, 32128, 512, False),
    )
}


def register_t5_preset(preset: T5Preset) -> None:
    """Add `preset` under its name (an architecture module registers its published sizes;
    a name is registered once)."""
    if preset.name in _PRESETS:
        raise ValueError(f"encoder-decoder preset {preset.name!r} is already registered")
    _PRESETS[preset.name] = preset


def _load_family_presets() -> None:
    # Families (protoformer.architectures, above the recipes) register their presets on import.
    importlib.import_module("protoformer.architectures")


def list_t5_presets() -> list[str]:
    """The names `get_t5_preset` accepts."""
    _load_family_presets()
    return list(_PRESETS)


def get_t5_preset(name: str) -> T5Preset:
    """The encoder-decoder preset called `name`; `ValueError` listing the known names otherwise."""
    _load_family_presets()
    preset = _PRESETS.get(name)
    if preset is None:
        raise ValueError(f"unknown encoder-decoder preset {name!r}; known: {', '.join(_PRESETS)}")
    return preset
