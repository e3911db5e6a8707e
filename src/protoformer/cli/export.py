"""`protoformer export RUN_DIR --format safetensors|hf --out DIR`: one checkpoint from a run's.

Reads any checkpoint a run wrote (a sharded `torch_dist` one saved on any layout, the
per-tensor-parallel-rank safetensors files, or a single-process one), rebuilds the model on
one process (the CPU by default) and writes

- `safetensors`: a single-process checkpoint, `DIR/checkpoints/step_N/model.safetensors`
  with its state.json and the run's tokenizer, which `protoformer generate --checkpoint DIR`
  and `load_checkpoint` read (the weights only: no optimizer state, so it is not resumable);
- `hf`: a Hugging Face checkpoint (`save_hf`: config.json and safetensors weights, plus the
  run's tokenizer.json) that `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Protocol

from protoformer.cli.generate import load_model
from protoformer.interop import save_hf
from protoformer.interop.hf_tokenizer import TOKENIZER_FILE
from protoformer.train.checkpoint import JSONValue, read_state, save_checkpoint

__all__ = ["FORMATS", "add_parser", "export_checkpoint", "run"]

FORMATS = ("safetensors", "hf")
# state.json entries that describe the saved run's layout or files, not the model.
_LAYOUT_KEYS = ("format", "step", "optimizer", "files", "layout", "rng_per_rank",
                "tensor_parallel", "expert_parallel")


class _Subparsers(Protocol):
    def add_parser(self, name: str, *, help: str, description: str) -> argparse.ArgumentParser: ...


def add_parser(commands: _Subparsers) -> None:
    parser = commands.add_parser(
        "export", help="write a run's checkpoint as one safetensors checkpoint or for Hugging Face",
        description="Export a run's checkpoint (sharded torch_dist on any layout, per-rank "
                    "safetensors, or single-process) as one single-process safetensors "
                    "checkpoint (--format safetensors, for generate/load_checkpoint) or as a "
                    "Hugging Face checkpoint (--format hf, for from_pretrained).")
    parser.add_argument("checkpoint", metavar="RUN_DIR",
                        help="a run directory (its latest checkpoint) or a step directory")
    parser.add_argument("--format", choices=FORMATS, required=True, dest="export_format",
                        help="safetensors (protoformer's single-process checkpoint) or hf")
    parser.add_argument("--out", required=True, help="the directory to write (new or empty)")
    parser.add_argument("--device", default="cpu",
                        help="where the model is rebuilt to gather the weights (default cpu)")
    parser.add_argument("--allow", action="append", default=[], metavar="PREFIX",
                        help="also allow importing the checkpoint's layer-spec builders from "
                             "modules under PREFIX")
    parser.set_defaults(handler=run)


def export_checkpoint(checkpoint: str | Path, out: str | Path, export_format: str, *,
                      device: str = "cpu", allow: tuple[str, ...] = ()) -> Path:
    """Write the checkpoint `checkpoint` names as `export_format` into `out`; returns what a
    reader opens (the step directory, or the Hugging Face directory)."""
    if export_format not in FORMATS:
        raise ValueError(f"--format {export_format!r}: use one of {', '.join(FORMATS)}")
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"--out {target}: exists and is not an empty directory; choose a new "
                         "one")
    model, step_dir = load_model(Path(checkpoint), device=device, allow=allow)
    state = read_state(step_dir)
    tokenizer = step_dir / TOKENIZER_FILE
    if export_format == "hf":
        written = save_hf(model, target)
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, written / TOKENIZER_FILE)
        return written
    step = state.get("step")
    assert isinstance(step, int)  # read_state checked it
    kept: dict[str, JSONValue] = {key: value for key, value in state.items()
                                  if key not in _LAYOUT_KEYS}
    kept["exported_from"] = str(step_dir)
    extra = {TOKENIZER_FILE: tokenizer} if tokenizer.is_file() else {}
    return save_checkpoint(target, step, model, None, kept, extra_files=extra)


def run(args: argparse.Namespace) -> int:
    written = export_checkpoint(args.checkpoint, args.out, str(args.export_format),
                                device=str(args.device), allow=tuple(str(a) for a in args.allow))
    print(f"exported {args.checkpoint} ({args.export_format}) -> {written}")
    return 0
