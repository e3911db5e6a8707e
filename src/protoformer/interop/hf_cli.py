"""What the `protoformer` command needs to run a Hugging Face checkpoint: model, tokenizer, stop tokens."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from protoformer.architectures import seq2seq_architecture
from protoformer.architectures.conversion import HFModelInfo, JSONDict
from protoformer.interop.hf import from_hf, hf_model_info
from protoformer.interop.hf_files import read_config
from protoformer.interop.hf_t5 import t5_from_hf
from protoformer.interop.hf_tokenizer import HFTokenizer, load_tokenizer
from protoformer.jsonio import JSONFileError, read_json_file
from protoformer.models import GPTModel, T5Model

__all__ = ["HFCheckpoint", "HFSeq2SeqCheckpoint", "is_t5_checkpoint", "load_hf_for_cli",
           "load_t5_for_cli"]


@dataclass(frozen=True)
class HFCheckpoint:
    """What `protoformer generate --hf PATH` needs: the model, its tokenizer and its stop tokens."""

    model: GPTModel
    tokenizer: HFTokenizer | None
    eos_token_ids: tuple[int, ...]
    info: HFModelInfo
    path: Path


@dataclass(frozen=True)
class HFSeq2SeqCheckpoint:
    """What `protoformer generate --hf PATH` needs for a T5 checkpoint."""

    model: T5Model
    tokenizer: HFTokenizer | None
    eos_token_ids: tuple[int, ...]
    decoder_start_token_id: int
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
            loaded: object = read_json_file(generation, what=generation.name)
        except (OSError, JSONFileError):
            loaded = None
        if isinstance(loaded, dict):
            ids = _token_ids(loaded.get("eos_token_id"))  # pyright: ignore[reportUnknownMemberType, reportUnknownArgumentType]  # JSON object
            if ids:
                return ids
    return _token_ids(config.get("eos_token_id"))


def _placement(device: str | torch.device | None,
               dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype | None]:
    """("auto" -> CUDA when available) and float32 on the CPU unless a dtype is given."""
    where = (torch.device("cuda" if torch.cuda.is_available() else "cpu")
             if device is None or device == "auto" else torch.device(device))
    if dtype is None and where.type == "cpu":
        dtype = torch.float32  # reduced precision is slow there
    return where, dtype


def load_hf_for_cli(path: str | os.PathLike[str], *, device: str | torch.device | None = "auto",
                    dtype: torch.dtype | None = None) -> HFCheckpoint:
    """Load a checkpoint directory for the command line: model (eval mode), tokenizer, EOS ids.

    `device="auto"` picks CUDA when available. `dtype=None` uses float32 on CPU (reduced
    precision is slow there) and the checkpoint's dtype elsewhere. The tokenizer is None when
    the directory has no tokenizer.json.
    """
    directory = Path(path)
    where, dtype = _placement(device, dtype)
    model = from_hf(directory, dtype=dtype, device=where).eval()
    info = hf_model_info(model)
    return HFCheckpoint(model=model, tokenizer=load_tokenizer(directory),
                        eos_token_ids=_eos_token_ids(directory, info.hf_config), info=info,
                        path=directory)



def is_t5_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether the checkpoint directory's config.json names a registered encoder-decoder
    architecture (T5, mT5), which `load_t5_for_cli` loads."""
    directory = Path(path)
    return ((directory / "config.json").is_file()
            and seq2seq_architecture(read_config(directory)) is not None)


def load_t5_for_cli(path: str | os.PathLike[str], *, device: str | torch.device | None = "auto",
                    dtype: torch.dtype | None = None) -> HFSeq2SeqCheckpoint:
    """`load_hf_for_cli` for a T5 checkpoint directory: a `T5Model` (eval mode), its tokenizer,
    end-of-sequence ids and the decoder's start token (config `decoder_start_token_id`, else
    the padding id, else 0)."""
    directory = Path(path)
    where, dtype = _placement(device, dtype)
    config = read_config(directory)
    model = t5_from_hf(directory, dtype=dtype, device=where).eval()
    start = (_token_ids(config.get("decoder_start_token_id"))
             or _token_ids(config.get("pad_token_id")) or (0,))[0]
    return HFSeq2SeqCheckpoint(model=model, tokenizer=load_tokenizer(directory),
                               eos_token_ids=_eos_token_ids(directory, config),
                               decoder_start_token_id=start, path=directory)
