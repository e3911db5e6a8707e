"""`protoformer generate`: continue a prompt with a trained checkpoint or a Hugging Face model.

A protoformer checkpoint (`--checkpoint`) decodes with the tokenizer its run trained with (the
tokenizer.json copied into every checkpoint), or, for a byte-level run, takes the prompt's
UTF-8 bytes as token ids. A Hugging Face checkpoint directory (`--hf`) brings its own tokenizer (tokenizer.json) and
stop tokens (generation_config.json or config.json `eos_token_id`).
"""

from __future__ import annotations

import argparse
import codecs
import sys
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Protocol

import torch

from protoformer.backends import get_backend
from protoformer.generation import generate, generate_batch, generate_seq2seq
from protoformer.interop import load_hf_for_cli, model_from_hf_config
from protoformer.interop.hf_cli import is_t5_checkpoint, load_t5_for_cli
from protoformer.interop.hf_tokenizer import TOKENIZER_FILE, StreamDecoder, TextTokenizer
from protoformer.models import GPTModel
from protoformer.recipes import get_preset
from protoformer.recipes.spec_data import stored_layer_spec
from protoformer.train.checkpoint import (
    STATE_FILE,
    CheckpointError,
    JSONValue,
    load_checkpoint,
    read_state,
    resolve_checkpoint,
)
from protoformer.train.checkpoint_files import verify_file
from protoformer.train.loop import resolve_device
from protoformer.train.tokenizer import RunTokenizer, load_run_tokenizer

__all__ = ["add_parser", "check_prompt_bytes", "checkpoint_tokenizer", "load_model", "run",
           "token_bytes"]

_REPLACEMENT = "\ufffd".encode()


_CUDA_GRAPH_CHOICES: dict[str, bool | None] = {"auto": None, "on": True, "off": False}


class _Subparsers(Protocol):
    def add_parser(self, name: str, *, help: str, description: str) -> argparse.ArgumentParser: ...


def add_parser(commands: _Subparsers) -> None:
    parser = commands.add_parser(
        "generate", help="continue a prompt with a trained checkpoint or a Hugging Face model",
        description="Continue a prompt, printing the text as it is generated: with a trained "
                    "byte-level checkpoint (--checkpoint), or with a Hugging Face checkpoint "
                    "directory and its tokenizer.json (--hf), stopping at its end-of-sequence "
                    "token. A T5 checkpoint reads the prompt with its encoder and prints what "
                    "its decoder writes.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path,
                        help="a run directory (uses checkpoints/latest) or a step directory")
    source.add_argument("--hf", type=Path, metavar="PATH",
                        help="a Hugging Face checkpoint directory (config.json, safetensors "
                             "weights and tokenizer.json)")
    parser.add_argument("--prompt", required=True, action="append",
                        help="the text to continue; repeat it to continue several prompts as "
                             "one batch (printed one after another when all are done)")
    parser.add_argument("--max-new-tokens", type=int, default=200,
                        help="tokens (bytes, for --checkpoint) to generate (default 200)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="sampling temperature (default 0.8; 0 is greedy)")
    parser.add_argument("--top-k", type=int, default=None,
                        help="sample from the k likeliest tokens")
    parser.add_argument("--top-p", type=float, default=None,
                        help="sample from the likeliest tokens holding probability p")
    parser.add_argument("--greedy", action="store_true", help="always take the likeliest token")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run (default auto)")
    parser.add_argument("--cuda-graph", choices=tuple(_CUDA_GRAPH_CHOICES), default="auto",
                        help="run each decode step as one CUDA graph replay (auto: on a GPU, "
                             "for models of self-attention layers; default auto)")
    parser.add_argument("--allow", metavar="PREFIX", action="append", default=[],
                        help="allow importing the checkpoint's layer-spec builders from modules "
                             "under PREFIX (as the run's train --allow did; repeatable)")
    parser.add_argument("--no-verify", action="store_true",
                        help="load a --checkpoint whose state.json records no checksums (edited "
                             "or foreign); the weights are then not checked for corruption")
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


def token_bytes(token: int) -> bytes:
    """The byte a byte-level model's token stands for; U+FFFD for an id past 255 (a model
    with a larger vocabulary, e.g. one started from a Hugging Face checkpoint)."""
    return bytes([token]) if 0 <= token < 256 else _REPLACEMENT


def load_model(checkpoint: Path, *, device: str = "auto", allow: Sequence[str] = (),
               verify: bool = True) -> tuple[GPTModel, Path]:
    """Rebuild the checkpoint's model and load its weights; returns (model, step directory).

    `verify=False` loads weights whose checksums state.json does not record."""
    step_dir = resolve_checkpoint(checkpoint)
    return _load_from(step_dir, read_state(step_dir), device, allow, verify=verify), step_dir


def _build_saved_model(step_dir: Path, state: dict[str, JSONValue], device: str,
                       allow: Sequence[str]) -> GPTModel:
    """The model a checkpoint describes, freshly initialised: from the Hugging Face config a
    run started from, else the preset with the layer spec the run resolved (if any).

    A stored spec is imported with the default allowlist plus `allow` (the `--allow` given to
    *this* command), never an allowlist read from the checkpoint: a file from elsewhere must
    not widen what may be imported."""
    placement = resolve_device(device)
    hf_config = state.get("hf_config")
    if isinstance(hf_config, dict):
        return model_from_hf_config(hf_config, device=placement)
    preset_name = state.get("preset")
    backend_name = state.get("backend", "local")
    if not isinstance(preset_name, str) or not isinstance(backend_name, str):
        raise CheckpointError(f"{step_dir / STATE_FILE}: lacks the 'preset' (and 'backend') "
                              "the model was built from")
    stored = state.get("layer_spec")
    spec = (stored_layer_spec(stored, allow=allow,
                              where=f"{step_dir / STATE_FILE} layer_spec")
            if stored is not None else None)
    return get_preset(preset_name).build_model(get_backend(backend_name), device=placement,
                                               layer_spec=spec,
                                               vocab_size=_saved_vocab_size(state))


def _load_from(step_dir: Path, state: dict[str, JSONValue], device: str,
               allow: Sequence[str] = (), *, verify: bool = True) -> GPTModel:
    model = _build_saved_model(step_dir, state, device, allow)
    load_checkpoint(step_dir, model, verify=verify)
    return model.eval()


def _stream_generation(model: GPTModel, prompt_ids: Sequence[int], args: argparse.Namespace, *,
                       echo: str, piece: Callable[[int], str], finish: Callable[[], str],
                       stop_token_ids: Collection[int] = ()) -> None:
    """Print `echo` (the prompt), then the text of each new token as it comes, then a newline."""

    def stream(token: int) -> None:
        sys.stdout.write(piece(token))
        sys.stdout.flush()

    def run_generation(max_new_tokens: int) -> list[int]:
        return generate(model, prompt_ids, max_new_tokens,
                        temperature=float(args.temperature), top_k=args.top_k, top_p=args.top_p,
                        greedy=bool(args.greedy), seed=args.seed, stream=stream,
                        stop_token_ids=stop_token_ids,
                        cuda_graph=_CUDA_GRAPH_CHOICES[str(args.cuda_graph)])

    run_generation(0)  # validates prompt and sampling options before the prompt is echoed
    sys.stdout.write(echo)
    sys.stdout.flush()
    run_generation(int(args.max_new_tokens))
    sys.stdout.write(finish() + "\n")


def _batch_generation(model: GPTModel, prompts_ids: Sequence[Sequence[int]],
                      args: argparse.Namespace, *, echoes: Sequence[str],
                      text: Callable[[list[int]], str],
                      stop_token_ids: Collection[int] = ()) -> None:
    """Several prompts decoded as one batch; print each prompt and its continuation, one
    blank line between them."""
    rows = generate_batch(model, prompts_ids, int(args.max_new_tokens),
                          temperature=float(args.temperature), top_k=args.top_k,
                          top_p=args.top_p, greedy=bool(args.greedy), seed=args.seed,
                          stop_token_ids=stop_token_ids,
                          cuda_graph=_CUDA_GRAPH_CHOICES[str(args.cuda_graph)])
    sys.stdout.write("\n".join(echo + text(row) + "\n" for echo, row in
                                zip(echoes, rows, strict=True)))
    sys.stdout.flush()


def _no_tokenizer(directory: Path) -> ValueError:
    return ValueError(f"{directory}: no {TOKENIZER_FILE}; generate --hf encodes the prompt with "
                      f"the checkpoint's own tokenizer, so copy {TOKENIZER_FILE} from the model's "
                      "repository into that directory")


def _run_hf_seq2seq(args: argparse.Namespace, prompts: Sequence[str], directory: Path,
                    device: torch.device) -> None:
    """A T5 checkpoint: each prompt is the encoder's input; print the decoder's text."""
    if _CUDA_GRAPH_CHOICES[str(args.cuda_graph)]:
        raise ValueError("--cuda-graph on: CUDA-graph decoding is for decoder-only models; "
                         "use --cuda-graph auto or off with a T5 checkpoint")
    checkpoint = load_t5_for_cli(directory, device=device)
    tokenizer = checkpoint.tokenizer
    if tokenizer is None:
        raise _no_tokenizer(directory)
    decoders = [StreamDecoder(tokenizer)]

    def stream(token: int) -> None:
        sys.stdout.write(decoders[-1].push(token))
        sys.stdout.flush()

    def run_generation(prompt: str, max_new_tokens: int) -> list[int]:
        return generate_seq2seq(
            checkpoint.model, tokenizer.encode(prompt), max_new_tokens,
            decoder_start_token_id=checkpoint.decoder_start_token_id,
            temperature=float(args.temperature), top_k=args.top_k, top_p=args.top_p,
            greedy=bool(args.greedy), seed=args.seed, stream=stream,
            stop_token_ids=checkpoint.eos_token_ids)

    for prompt in prompts:
        run_generation(prompt, 0)  # validates every input and the sampling options first
    for index, prompt in enumerate(prompts):  # one after another: T5 decodes one input a call
        if index:
            sys.stdout.write("\n")
            decoders.append(StreamDecoder(tokenizer))
        run_generation(prompt, int(args.max_new_tokens))
        sys.stdout.write(decoders[-1].flush() + "\n")


def _run_hf(args: argparse.Namespace, prompts: Sequence[str]) -> None:
    directory = Path(args.hf)
    device = resolve_device(str(args.device))
    if directory.is_dir() and not (directory / TOKENIZER_FILE).is_file():
        raise _no_tokenizer(directory)  # before the (slower) weight loading
    if is_t5_checkpoint(directory):
        _run_hf_seq2seq(args, prompts, directory, device)
        return
    checkpoint = load_hf_for_cli(directory, device=device)
    if checkpoint.tokenizer is None:
        raise _no_tokenizer(directory)
    tokenizer = checkpoint.tokenizer
    if len(prompts) > 1:
        _batch_generation(checkpoint.model, [tokenizer.encode(p) for p in prompts], args,
                          echoes=prompts, text=lambda ids: _decode_stream(tokenizer, ids),
                          stop_token_ids=checkpoint.eos_token_ids)
        return
    decoder = StreamDecoder(tokenizer)
    _stream_generation(checkpoint.model, tokenizer.encode(prompts[0]), args, echo=prompts[0],
                       piece=decoder.push, finish=decoder.flush,
                       stop_token_ids=checkpoint.eos_token_ids)


def _decode_stream(tokenizer: TextTokenizer, ids: Sequence[int]) -> str:
    """The text the streaming decoder would print for `ids` (the same pieces, joined)."""
    decoder = StreamDecoder(tokenizer)
    return "".join(decoder.push(token) for token in ids) + decoder.flush()


def checkpoint_tokenizer(step_dir: Path, state: dict[str, JSONValue]) -> RunTokenizer | None:
    """The tokenizer a run trained with (its tokenizer.json, checked against state.json's
    size and sha256), or None for a byte-level run."""
    path = step_dir / TOKENIZER_FILE
    files = state.get("files")
    record = files.get(TOKENIZER_FILE) if isinstance(files, dict) else None
    if record is None and not path.exists():
        return None
    verify_file(path, record)
    return load_run_tokenizer(path)


def _run_with_tokenizer(model: GPTModel, tokenizer: RunTokenizer, args: argparse.Namespace,
                        prompts: Sequence[str]) -> None:
    """Generate with the tokenizer the checkpoint's run trained with."""
    stop = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
    text_tokenizer = tokenizer.tokenizer
    if len(prompts) > 1:
        _batch_generation(model, [tokenizer.encode(p) for p in prompts], args, echoes=prompts,
                          text=lambda ids: _decode_stream(text_tokenizer, ids),
                          stop_token_ids=stop)
        return
    decoder = StreamDecoder(text_tokenizer)
    _stream_generation(model, tokenizer.encode(prompts[0]), args, echo=prompts[0],
                       piece=decoder.push, finish=decoder.flush, stop_token_ids=stop)


def _run_checkpoint(args: argparse.Namespace, prompts: Sequence[str]) -> None:
    prompt_bytes = [prompt.encode("utf-8") for prompt in prompts]
    step_dir = resolve_checkpoint(Path(args.checkpoint))
    state = read_state(step_dir)
    tokenizer = checkpoint_tokenizer(step_dir, state)
    if tokenizer is not None:  # the run's own tokenizer travels with its checkpoint
        model = _load_from(step_dir, state, str(args.device), [str(a) for a in args.allow])
        _run_with_tokenizer(model, tokenizer, args, prompts)
        return
    vocab_size = _saved_vocab_size(state)
    if vocab_size is not None:  # before the (slower) model build
        for encoded in prompt_bytes:
            check_prompt_bytes(encoded, vocab_size)
    model = _load_from(step_dir, state, str(args.device), [str(a) for a in args.allow],
                       verify=not args.no_verify)
    if len(prompts) > 1:
        _batch_generation(model, [list(encoded) for encoded in prompt_bytes], args,
                          echoes=prompts, text=lambda ids: b"".join(
                              token_bytes(token) for token in ids).decode("utf-8", "replace"))
        return
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    _stream_generation(model, list(prompt_bytes[0]), args, echo=prompts[0],
                       piece=lambda token: decoder.decode(token_bytes(token)),
                       finish=lambda: decoder.decode(b"", final=True))


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: must be >= 0")
    prompts: list[str] = list(args.prompt)
    if not all(prompts):
        raise ValueError("--prompt is empty; give at least one character to continue")
    if args.hf is not None:
        _run_hf(args, prompts)
    else:
        _run_checkpoint(args, prompts)
    return 0
