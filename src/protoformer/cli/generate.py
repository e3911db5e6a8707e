"""`protoformer generate`: continue a prompt with a trained checkpoint, streaming the text."""

from __future__ import annotations

import argparse
import codecs
import sys
from pathlib import Path
from typing import Protocol

from protoformer.backends import get_backend
from protoformer.generation import generate
from protoformer.models import GPTModel
from protoformer.recipes import get_preset
from protoformer.train.checkpoint import (
    CheckpointError,
    JSONValue,
    load_checkpoint,
    read_state,
    resolve_checkpoint,
)
from protoformer.train.loop import resolve_device

__all__ = ["add_parser", "check_prompt_bytes", "load_model", "run"]


class _Subparsers(Protocol):
    def add_parser(self, name: str, *, help: str, description: str) -> argparse.ArgumentParser: ...


def add_parser(commands: _Subparsers) -> None:
    parser = commands.add_parser(
        "generate", help="continue a prompt with a trained checkpoint",
        description="Continue a prompt with a trained byte-level checkpoint, printing the "
                    "bytes as they are generated.")
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="a run directory (uses checkpoints/latest) or a step directory")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200,
                        help="bytes to generate (default 200)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="sampling temperature (default 0.8; 0 is greedy)")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest bytes")
    parser.add_argument("--top-p", type=float, default=None,
                        help="sample from the likeliest bytes holding probability p")
    parser.add_argument("--greedy", action="store_true", help="always take the likeliest byte")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run (default auto)")
    parser.set_defaults(handler=run)


def _saved_vocab_size(state: dict[str, JSONValue]) -> int | None:
    model = state.get("model")
    vocab_size = model.get("vocab_size") if isinstance(model, dict) else None
    return vocab_size if isinstance(vocab_size, int) else None


def check_prompt_bytes(prompt: bytes, vocab_size: int) -> None:
    """`ValueError` naming the prompt's bytes that are not token ids of a `vocab_size` model."""
    outside = sorted({b for b in prompt if b >= vocab_size})
    if outside:
        shown = ", ".join(str(b) for b in outside[:5])
        raise ValueError(f"prompt byte(s) {shown} are outside the model's vocabulary "
                         f"[0, {vocab_size}); use characters the model was trained on")


def load_model(checkpoint: Path, *, device: str = "auto") -> tuple[GPTModel, Path]:
    """Rebuild the checkpoint's preset and load its weights; returns (model, step directory)."""
    step_dir = resolve_checkpoint(checkpoint)
    return _load_from(step_dir, read_state(step_dir), device), step_dir


def _load_from(step_dir: Path, state: dict[str, JSONValue], device: str) -> GPTModel:
    preset_name = state.get("preset")
    backend_name = state.get("backend", "local")
    if not isinstance(preset_name, str) or not isinstance(backend_name, str):
        raise CheckpointError(f"{step_dir / 'state.json'}: lacks the 'preset' (and 'backend') "
                              "the model was built from")
    model = get_preset(preset_name).build_model(get_backend(backend_name),
                                                device=resolve_device(device))
    load_checkpoint(step_dir, model)
    return model.eval()


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: must be >= 0")
    prompt: str = args.prompt
    prompt_bytes = prompt.encode("utf-8")
    if not prompt_bytes:
        raise ValueError("--prompt is empty; give at least one character to continue")
    step_dir = resolve_checkpoint(Path(args.checkpoint))
    state = read_state(step_dir)
    vocab_size = _saved_vocab_size(state)
    if vocab_size is not None:  # before the (slower) model build
        check_prompt_bytes(prompt_bytes, vocab_size)
    model = _load_from(step_dir, state, str(args.device))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def stream(token: int) -> None:
        sys.stdout.write(decoder.decode(bytes([token])))
        sys.stdout.flush()

    def run_generation(max_new_tokens: int) -> list[int]:
        return generate(model, list(prompt_bytes), max_new_tokens,
                        temperature=float(args.temperature), top_k=args.top_k, top_p=args.top_p,
                        greedy=bool(args.greedy), seed=args.seed, stream=stream)

    run_generation(0)  # validates prompt and sampling options before the prompt is echoed
    sys.stdout.write(prompt)
    sys.stdout.flush()
    run_generation(int(args.max_new_tokens))
    sys.stdout.write(decoder.decode(b"", final=True) + "\n")
    return 0
