"""Recipes: layer specs assembled from a backend, and named model presets."""

from protoformer.recipes.gpt import gpt_layer_spec, mlp_spec
from protoformer.recipes.layer_pattern import layer_pattern_from_freq, layer_specs_from_pattern
from protoformer.recipes.mla import mla_layer_spec
from protoformer.recipes.presets import Preset, get_preset, list_presets
from protoformer.recipes.t5 import t5_decoder_layer_spec, t5_encoder_layer_spec
from protoformer.recipes.t5_presets import T5Preset, get_t5_preset, list_t5_presets

__all__ = ["Preset", "T5Preset", "get_preset", "get_t5_preset", "gpt_layer_spec",
           "layer_pattern_from_freq", "layer_specs_from_pattern", "list_presets",
           "list_t5_presets", "mla_layer_spec", "mlp_spec", "t5_decoder_layer_spec",
           "t5_encoder_layer_spec"]
