"""What the `protoformer` command needs to run a Hugging Face checkpoint: model, tokenizer, stop tokens."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from protoformer.interop.hf import from_hf, hf_model_info
from protoformer.interop.hf_common import HFModelInfo, JSONDict
from protoformer.interop.hf_tokenizer import HFTokenizer, load_tokenizer
from protoformer.models import GPTModel

__all__ = ["HFCheckpoint", "load_hf_for_cli"]


@dataclass(frozen=True)
class HFCheckpoint:
    """What `protoformer generate --hf PATH` needs: the model, its tokenizer and its stop tokens."""

    model: GPTModel
    tokenizer: HFTokenizer | None
    eos_token_ids: tuple[int, ...]
    info: HFModelInfo
    path: Path


def _token_ids(value: object) -> tuple[int, ...]:
    if isinstance(value, bool):
        return ()
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, int) and not isinstance(v, bool))  # pyright: ignore[reportUnknownVariableType]  # JSON list
    return ()


def _eos_token_ids(directory: Path, config: JSONDict) -> tuple[int, ...]:
    generation = directory / "generation_config.json"
    if generation.is_file():
        try:
            loaded: object = json.loads(generation.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            loaded = None
        if isinstance(loaded, dict):
            ids = _token_ids(loaded.get("eos_token_id"))  # pyright: ignore[reportUnknownMemberType, reportUnknownArgumentType]  # JSON object
            if ids:
                return ids
    return _token_ids(config.get("eos_token_id"))


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_hf_for_cli(path: str | os.PathLike[str], *, device: str | torch.device | None = "auto",
                    dtype: torch.dtype | None = None) -> HFCheckpoint:
    """Load a checkpoint directory for the command line: model (eval mode), tokenizer, EOS ids.

    `device="auto"` picks CUDA when available. `dtype=None` uses float32 on CPU (reduced
    precision is slow there) and the checkpoint's dtype elsewhere. The tokenizer is None when
    the directory has no tokenizer.json.
    """
    directory = Path(path)
    where = _resolve_device(device)
    if dtype is None and where.type == "cpu":
        dtype = torch.float32
    model = from_hf(directory, dtype=dtype, device=where).eval()
    info = hf_model_info(model)
    return HFCheckpoint(model=model, tokenizer=load_tokenizer(directory),
                        eos_token_ids=_eos_token_ids(directory, info.hf_config), info=info,
                        path=directory)

