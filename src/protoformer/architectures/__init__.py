"""Model families: one module per Hugging Face architecture, found by `model_type`.

Each module registers its architecture object(s) (`registry.CausalLMArchitecture` or
`registry.Seq2SeqArchitecture`: config reader, layer recipe, tensor conversion rules, config
writer) and its published-size presets when imported; importing this package registers the
built-in families. `protoformer.interop` and the `protoformer` command look them up here.
"""

# Registration order is the order of `SUPPORTED_ARCHITECTURES`, of the presets and of the
# architectures `save_hf` tries for a model that was not read from Hugging Face.
from protoformer.architectures import llama

# isort: split
from protoformer.architectures import deepseek_v3, t5

# isort: split
from protoformer.architectures import mixtral, olmoe, qwen_moe

# isort: split
from protoformer.architectures import gemma

# isort: split
from protoformer.architectures import gpt_neox, phi3

# isort: split
from protoformer.architectures import gemma2

# isort: split
from protoformer.architectures import gemma3, olmo2
from protoformer.architectures.registry import (
    SUPPORTED_ARCHITECTURES,
    CausalLMArchitecture,
    ModelSizes,
    Seq2SeqArchitecture,
    causal_lm_architecture,
    register_architecture,
    register_seq2seq_architecture,
    registered_model_types,
    seq2seq_architecture,
)

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "CausalLMArchitecture",
    "ModelSizes",
    "Seq2SeqArchitecture",
    "causal_lm_architecture",
    "deepseek_v3",
    "gemma",
    "gemma2",
    "gemma3",
    "gpt_neox",
    "llama",
    "mixtral",
    "olmo2",
    "olmoe",
    "phi3",
    "qwen_moe",
    "register_architecture",
    "register_seq2seq_architecture",
    "registered_model_types",
    "seq2seq_architecture",
    "t5",
]
