"""Hugging Face checkpoints in and out (`hf`; encoder-decoder T5 in `hf_t5`).

What each architecture looks like lives in `protoformer.architectures`; this package reads and
writes the files and walks the architecture's conversion rules.
"""

from protoformer.architectures import SUPPORTED_ARCHITECTURES
from protoformer.architectures.conversion import (
    HFConversionError,
    HFModelInfo,
    UnsupportedHFModelError,
)
from protoformer.interop.hf import (
    from_hf,
    hf_config_dict,
    hf_model_info,
    model_from_hf_config,
    parse_hf_config,
    save_hf,
    to_hf,
)
from protoformer.interop.hf_cli import HFCheckpoint, load_hf_for_cli
from protoformer.interop.hf_t5 import save_t5_hf, t5_from_hf, t5_hf_config, t5_to_hf

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "HFCheckpoint",
    "HFConversionError",
    "HFModelInfo",
    "UnsupportedHFModelError",
    "from_hf",
    "hf_config_dict",
    "hf_model_info",
    "load_hf_for_cli",
    "model_from_hf_config",
    "parse_hf_config",
    "save_hf",
    "save_t5_hf",
    "t5_from_hf",
    "t5_hf_config",
    "t5_to_hf",
    "to_hf",
]
