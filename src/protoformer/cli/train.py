"""`protoformer train`: train a model on text, checkpoint it and show a sample.

The model is a preset, optionally with its layer spec from a file and overrides (`--spec`,
`--set`, `--allow`), or a Hugging Face checkpoint's architecture and weights
(`--init-from-hf`). Checkpoints record the resolved spec or the Hugging Face config, so
`--resume` and `protoformer generate --checkpoint` rebuild the same model.

Under `torchrun` (several processes) every rank runs this command: `--tp N` splits the model
over N ranks, `--pp P` its layers over P pipeline stages, the rest are data-parallel replicas. Rank 0 prints; an error on any rank ends
the whole job with that rank's message (`protoformer.distributed.fail_fast`).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Protocol, cast

from protoformer.cli.generate import token_bytes
from protoformer.cli.spec_args import add_spec_arguments
from protoformer.cli.train_config import ConfigFileAction, resolved_config, toml_text
from protoformer.distributed import LaunchEnvironment, barrier, destroy_distributed, fail_fast
from protoformer.generation import generate
from protoformer.parallel.pipeline_schedule import PIPELINE_SCHEDULES
from protoformer.spec import SpecError
from protoformer.train.checkpoint import CheckpointError, JSONValue, latest_checkpoint, read_state
from protoformer.train.loop import TrainOptions, TrainResult, train
from protoformer.train.schedule import DECAY_STYLES

__all__ = ["add_parser", "config_document", "options_from_args", "run"]

SAMPLE_PROMPT = "def "
SAMPLE_TOKENS = 200
_DEFAULTS = TrainOptions()
# Command-line flag -> TrainOptions field (the flags every run may set).
_FLAGS = {
    "preset": "preset", "steps": "steps", "data": "data", "batch_size": "batch_size",
    "seq_len": "seq_len", "lr": "lr", "warmup_steps": "warmup_steps",
    "eval_every": "eval_every", "save_every": "save_every", "log_every": "log_every",
    "seed": "seed", "backend": "backend", "device": "device", "tp": "tp", "ep": "ep",
    "sequence_parallel": "sequence_parallel", "dist_timeout": "dist_timeout",
    "init_from_hf": "init_from_hf", "spec": "spec", "micro_batch_size": "micro_batch_size",
    "tokenizer": "tokenizer",
    "max_corpus_bytes": "max_corpus_bytes", "eval_batches": "eval_batches",
    "weight_decay": "weight_decay", "grad_clip": "grad_clip", "min_lr": "min_lr",
    "lr_decay_style": "lr_decay_style", "lr_wsd_decay_steps": "lr_wsd_decay_steps",
    "precision": "precision", "tensorboard": "tensorboard", "peak_tflops": "peak_tflops",
    "fsdp": "fsdp", "reshard_after_forward": "reshard_after_forward",
    "pp": "pp", "pp_schedule": "pp_schedule",
    "virtual_pipeline_model_parallel_size": "virtual_pipeline_model_parallel_size",
    "ckpt_format": "ckpt_format", "async_save": "async_save", "compile": "compile",
    "recompute_granularity": "recompute_granularity",
}
# Repeatable flags (empty when not given) -> TrainOptions field.
_LIST_FLAGS = {"overrides": "overrides", "allow": "allow"}


class _Subparsers(Protocol):
    def add_parser(self, name: str, *, help: str, description: str) -> argparse.ArgumentParser: ...


def add_parser(commands: _Subparsers) -> None:
    parser = commands.add_parser(
        "train", help="train a preset on a byte-level corpus",
        description="Train a preset on a byte-level corpus (default: the Python standard "
                    "library's source). With no arguments, trains the tiny preset in about "
                    "2-3 minutes on a laptop CPU. --spec/--set replace or edit the preset's "
                    "layer spec; --init-from-hf starts from a Hugging Face checkpoint instead. "
                    "With --resume, options not given on the command line come from the run's "
                    "latest checkpoint, and the model is rebuilt as the checkpoint records it.")
    d = _DEFAULTS
    parser.add_argument("--config", type=Path, metavar="FILE", action=ConfigFileAction,
                        help="a TOML file of flags (every flag is a key: batch-size = 8); flags "
                             "given on the command line win over it")
    parser.add_argument("--preset", help=f"model preset (default {d.preset})")
    parser.add_argument("--init-from-hf", type=Path, metavar="PATH",
                        help="start from a Hugging Face checkpoint directory (its architecture "
                             "and weights) instead of a preset; single process or data-parallel "
                             "only, local backend")
    parser.add_argument("--steps", type=int, help=f"optimizer steps (default {d.steps})")
    parser.add_argument("--out", type=Path, default=d.out_dir,
                        help=f"run directory for checkpoints and the loss curve (default {d.out_dir})")
    parser.add_argument("--overwrite", action="store_true", default=None,
                        help="replace the run already in --out (its checkpoints, metrics and "
                             "loss curve) instead of refusing to")
    parser.add_argument("--data", type=Path,
                        help="a dataset directory from `protoformer prepare-data` (streamed, any "
                             "size), or a text file or directory of text files (read into "
                             "memory, up to --max-corpus-bytes) (default: the Python standard "
                             "library's source)")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="a tokenizer.json or a directory with one (local; nothing is "
                             "downloaded), or 'bytes' (default: the dataset's, else the "
                             "--init-from-hf checkpoint's, else bytes)")
    parser.add_argument("--max-corpus-bytes", type=int,
                        help="largest raw-text --data read into memory; more is refused, "
                             f"pointing to prepare-data (default {d.max_corpus_bytes:,})")
    parser.add_argument("--batch-size", type=int,
                        help="sequences per optimizer step over all data-parallel replicas "
                             f"(default {d.batch_size}); the same as --global-batch-size")
    parser.add_argument("--global-batch-size", type=int, metavar="N",
                        help="Megatron's name for --batch-size: sequences per optimizer step "
                             "over all data-parallel replicas")
    parser.add_argument("--micro-batch-size", type=int, metavar="N",
                        help="sequences per forward/backward on one replica; the step "
                             "accumulates global / (micro x data-parallel size) micro-batches "
                             "(default: the whole replica share, no accumulation)")
    parser.add_argument("--seq-len", type=int, help=f"bytes per sequence (default {d.seq_len})")
    parser.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    parser.add_argument("--min-lr", type=float,
                        help=f"the schedule's floor (default {d.min_lr_ratio} x --lr)")
    parser.add_argument("--lr-decay-style", choices=DECAY_STYLES,
                        help=f"decay after warmup (default {d.lr_decay_style}); WSD holds the "
                             "peak, then decays linearly over --lr-wsd-decay-steps")
    parser.add_argument("--lr-wsd-decay-steps", type=int,
                        help="WSD's decay steps (default a fifth of the steps after warmup)")
    parser.add_argument("--warmup-steps", type=int,
                        help=f"linear warmup steps before the decay (default {d.warmup_steps})")
    parser.add_argument("--weight-decay", type=float,
                        help=f"AdamW weight decay of the matrices (default {d.weight_decay})")
    parser.add_argument("--clip-grad", type=float, dest="grad_clip",
                        help=f"clip the gradient norm to this (default {d.grad_clip})")
    parser.add_argument("--adam-beta1", type=float, help=f"AdamW beta1 (default {d.betas[0]})")
    parser.add_argument("--adam-beta2", type=float, help=f"AdamW beta2 (default {d.betas[1]})")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--precision", choices=("auto", "bf16", "fp32"),
                           help="auto: bf16 autocast on CUDA, fp32 elsewhere (default auto)")
    precision.add_argument("--bf16", dest="precision", action="store_const", const="bf16",
                           help="bf16 autocast (norms, softmax and loss in fp32), on any device")
    precision.add_argument("--fp32", dest="precision", action="store_const", const="fp32",
                           help="full fp32, also on CUDA")
    parser.add_argument("--eval-every", type=int,
                        help=f"steps between validation losses (default {d.eval_every})")
    parser.add_argument("--eval-batches", type=int,
                        help=f"batches per validation loss (default {d.eval_batches})")
    parser.add_argument("--save-every", type=int,
                        help=f"steps between checkpoints (default {d.save_every})")
    parser.add_argument("--log-every", type=int,
                        help=f"steps between log lines without a terminal (default {d.log_every})")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its latest checkpoint")
    parser.add_argument("--seed", type=int, help=f"random seed (default {d.seed})")
    parser.add_argument("--backend", help=f"layer implementation backend (default {d.backend})")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="compile each transformer layer with torch.compile (fuses norms, "
                             "activations, RoPE and residual adds; the first steps compile); "
                             "eager, with a warning, where compilation cannot work")
    parser.add_argument("--recompute-granularity", choices=("full", "selective"),
                        help="recompute activations in backward: full = whole layers (only each "
                             "layer's input kept), selective = core attention (default: none)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"),
                        help="where to train (default auto: CUDA when available)")
    parser.add_argument("--tp", type=int,
                        help="tensor-parallel size: split the model over this many processes "
                             "(launch with torchrun --nproc-per-node N; N / tp data-parallel "
                             f"replicas; default {d.tp})")
    parser.add_argument("--ep", type=int,
                        help="expert-parallel size: split an MoE preset's experts over this many "
                             "data-parallel processes, which exchange tokens by all-to-all "
                             f"(launch with torchrun; default {d.ep})")
    parser.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int,
                        help="pipeline-parallel size: split the layers into this many stages "
                             "on consecutive ranks (launch with torchrun; needs at least that "
                             f"many micro-batches per step, see --micro-batch-size; default {d.pp})")
    parser.add_argument("--pp-schedule", choices=PIPELINE_SCHEDULES,
                        help="with --pp: the torch.distributed.pipelining schedule (default "
                             "1F1B, or Interleaved1F1B with virtual stages); with --pp 1 every "
                             "stage runs on each rank (one process included)")
    parser.add_argument("--virtual-pipeline-model-parallel-size", type=int, metavar="V",
                        help="with --pp: stages per rank of the Interleaved1F1B schedule "
                             "(default 2 with it)")
    parser.add_argument("--sequence-parallel", action="store_true", default=None,
                        help="with --tp > 1, also split norms and dropout along the sequence")
    parser.add_argument("--fsdp", action="store_true", default=None,
                        help="shard parameters, gradients and optimizer state over the "
                             "data-parallel ranks (FSDP2) instead of DDP; checkpoints are "
                             "sharded (torch.distributed.checkpoint)")
    parser.add_argument("--no-reshard-after-forward", dest="reshard_after_forward",
                        action="store_false", default=None,
                        help="with --fsdp: keep each layer's gathered parameters from forward "
                             "to backward (more memory, less communication)")
    parser.add_argument("--ckpt-format", choices=("torch_dist", "safetensors"),
                        help="checkpoint format: torch_dist (sharded, torch.distributed."
                             "checkpoint; resumes on another --tp/--fsdp layout or one process) "
                             "or safetensors (one file per tensor-parallel rank); default "
                             "torch_dist with --fsdp or --pp, else safetensors")
    parser.add_argument("--async-save", action="store_true", default=None,
                        help="with torch_dist checkpoints: write them in the background while "
                             "training goes on (published at the next save or at the end)")
    parser.add_argument("--dist-timeout", type=float,
                        help="seconds a rank waits for the others in a collective before the "
                             f"run fails (default {d.dist_timeout:.0f})")
    parser.add_argument("--peak-tflops", type=float, metavar="TFLOPS",
                        help="one device's peak TFLOP/s, for the MFU in the log (default: the "
                             "data-sheet peak of known GPUs; none on a CPU)")
    parser.add_argument("--tensorboard", action="store_true", default=None,
                        help="also write the metrics as TensorBoard events under --out/tensorboard "
                             "(pip install tensorboard)")
    parser.add_argument("--no-sample", action="store_true",
                        help="skip the sample generation after training")
    add_spec_arguments(parser)
    parser.set_defaults(handler=run)


def _saved_options(out_dir: Path) -> dict[str, JSONValue]:
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is None:
        raise ValueError(f"--resume: no checkpoint in {out_dir / 'checkpoints'}; train without "
                         "--resume to start a new run")
    saved = read_state(checkpoint).get("train_options")
    return saved if isinstance(saved, dict) else {}


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    """TrainOptions from the flags given; with --resume, the rest from the checkpoint."""
    values: dict[str, object] = {}
    if args.resume:
        fields = {f.name for f in dataclasses.fields(TrainOptions)}
        for name, value in _saved_options(Path(args.out)).items():
            # The import allowlist is never taken from a checkpoint: --allow must be given again.
            if name in fields and name != "allow":
                values[name] = tuple(value) if isinstance(value, list) else value
    for flag, name in _FLAGS.items():
        given: object = getattr(args, flag)
        if given is not None:
            values[name] = given
    for flag, name in _LIST_FLAGS.items():
        items: list[str] = getattr(args, flag)
        if items:
            values[name] = tuple(items)
    if args.global_batch_size is not None:
        if args.batch_size is not None and args.batch_size != args.global_batch_size:
            raise ValueError(f"--batch-size {args.batch_size} and --global-batch-size "
                             f"{args.global_batch_size} name the same thing (sequences per "
                             "optimizer step); give one of them")
        values["batch_size"] = args.global_batch_size
    if args.adam_beta1 is not None or args.adam_beta2 is not None:
        saved_betas = values.get("betas", _DEFAULTS.betas)
        beta1, beta2 = cast("tuple[float, float]", saved_betas)  # a pair from a checkpoint
        given1: float | None = args.adam_beta1
        given2: float | None = args.adam_beta2
        values["betas"] = (beta1 if given1 is None else given1,
                           beta2 if given2 is None else given2)
    if args.init_from_hf is not None and args.preset is not None:
        raise ValueError("--preset and --init-from-hf both choose the model; give one of them")
    data = values.get("data")
    if isinstance(data, str):
        values["data"] = Path(data)
    values["out_dir"] = Path(args.out)
    values["resume"] = bool(args.resume)
    values["overwrite"] = bool(args.overwrite)
    # The values come from argparse (typed by each flag) and from a checkpoint written by
    # TrainOptions.to_json; TrainOptions.__post_init__ checks them.
    options: TrainOptions = TrainOptions(**values)  # type: ignore[arg-type]
    return options


def config_document(options: TrainOptions) -> dict[str, object]:
    """The resolved options as a `--config` file's keys (the flags), for config.toml."""
    flag_of = {name: flag for flag, name in _FLAGS.items()}
    flag_of.update({"grad_clip": "clip_grad", "overrides": "set", "allow": "allow"})
    values: dict[str, object] = {"out": options.out_dir}
    for item in dataclasses.fields(options):
        flag = flag_of.get(item.name)
        if flag is not None:
            values[flag.replace("_", "-")] = getattr(options, item.name)
    # The one negative flag: its key holds the negation of the option.
    values["no-reshard-after-forward"] = not values.pop("reshard-after-forward")
    if options.init_from_hf is not None:
        del values["preset"]  # the Hugging Face checkpoint chooses the model
    values["min-lr"] = options.schedule().min_lr
    values["adam-beta1"], values["adam-beta2"] = options.betas
    return resolved_config(values)


def _summary(result: TrainResult) -> list[str]:
    lines: list[str] = []
    if result.train_losses:
        first_step, first = result.train_losses[0]
        last_step, last = result.train_losses[-1]
        lines.append(f"train loss {first:.4f} (step {first_step}) -> {last:.4f} "
                     f"(step {last_step})")
    if result.validation_losses:
        step, value = result.validation_losses[-1]
        lines.append(f"validation loss {value:.4f} (step {step})")
    lines.append(f"{result.steps_run} steps in {result.elapsed_seconds:.1f} s, "
                 f"{result.tokens_per_second:,.0f} tokens/s")
    if result.checkpoint is not None:
        lines.append(f"checkpoint: {result.checkpoint}")
    if result.loss_curve is not None:
        lines.append(f"loss curve: {result.loss_curve}")
    return lines


def run(args: argparse.Namespace) -> int:
    launch = LaunchEnvironment.from_env()
    # Under torchrun: one rank's error ends every rank, in one line for a user error.
    with fail_fast(launch, user_errors=(SpecError, CheckpointError, ValueError, OSError,
                                        ImportError)):
        options = options_from_args(args)
        result = train(options, resolved_config=toml_text(config_document(options)))
        if launch.is_rank_zero:
            for line in _summary(result):
                print(line)
        if not args.no_sample:
            _sample(result, options, launch)
        barrier()
        destroy_distributed()
    return 0


def _sample(result: TrainResult, options: TrainOptions, launch: LaunchEnvironment) -> None:
    """Generate a sample: rank 0 alone, or every tensor-parallel rank together (rank 0 prints)."""
    if options.ep > 1:
        if launch.is_rank_zero:
            print("sample: skipped (the experts are split over the expert-parallel ranks; "
                  "sample with protoformer generate --checkpoint, which merges them)")
        return
    if options.tp > 1 and result.model.config.sequence_parallel:
        if launch.is_rank_zero:
            print("sample: skipped (one-token decoding steps cannot be split along the "
                  "sequence; train without --sequence-parallel to sample here)")
        return
    if options.pp > 1:
        if launch.is_rank_zero:
            print("sample: skipped (the layers are split over the pipeline stages by --pp); "
                  f"sample with protoformer generate --checkpoint {options.out_dir}")
        return
    if options.fsdp and launch.is_distributed:
        if launch.is_rank_zero:
            print("sample: skipped (the weights are sharded over the ranks by --fsdp); "
                  "generate from the checkpoint after exporting it (protoformer export)")
        return
    if options.tp == 1 and not launch.is_rank_zero:
        return  # data-parallel replicas are identical: rank 0 samples alone
    tokenizer = result.tokenizer
    prompt = tokenizer.encode(SAMPLE_PROMPT)
    new = generate(result.model, prompt, SAMPLE_TOKENS, temperature=0.8, top_k=40,
                   seed=options.seed, stop_token_ids=() if tokenizer.eos_token_id is None
                   else (tokenizer.eos_token_id,))
    if not launch.is_rank_zero:
        return
    if tokenizer.is_bytes:
        text = (bytes(prompt) + b"".join(token_bytes(token) for token in new)).decode(
            "utf-8", errors="replace")
    else:
        text = SAMPLE_PROMPT + tokenizer.decode(new)
    print(f"sample (temperature 0.8, top-k 40, prompt {SAMPLE_PROMPT!r}):")
    print(text)
    if options.tp == 1:
        print(f"more: protoformer generate --checkpoint {options.out_dir} --prompt "
              f"{SAMPLE_PROMPT.strip()!r}")
