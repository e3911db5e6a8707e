"""Tensor-parallel scaling: training tokens/s of a 7B-like GPT at TP = 1, 2, 4 on one node.

Shape: hidden 4096, 32 heads, SwiGLU FFN 11008, RMSNorm, no biases, vocabulary 32000 (the
Llama-2-7B layer) with `--layers` layers (4 by default), bf16 parameters, sequence 2048,
micro-batch 2. One measured step is forward + vocabulary-parallel loss + backward +
`finalize_model_grads` (no optimizer: its cost does not depend on the split). Each tensor-
parallel size runs in its own `torchrun` launch, with and without sequence parallelism.

Run (needs CUDA GPUs; NCCL; prints a markdown table):

    NCCL_NVLS_ENABLE=0 PYTHONPATH=src python3 benchmarks/tp_scaling.py --launch

`--launch` starts `torchrun --standalone --nproc-per-node T` for each T <= the GPU count
(bounded by `--launch-timeout` seconds each and `--deadline` overall) and collects the
results; without it the script is the per-rank worker that torchrun runs. Any failed or
timed-out launch is reported with its output and makes the script exit non-zero.

Metrics: tokens/s = micro-batch * sequence / step time (one model replica, all its GPUs);
speedup = tokens/s / tokens/s at TP=1; efficiency = speedup / TP (1.0 = perfect scaling);
TFLOP/s per GPU uses `protoformer.flops.flops_per_token` (6 N + attention, causal not
credited) divided by TP.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from protoformer import TransformerConfig
from protoformer.backends import get_backend
from protoformer.distributed import destroy_distributed, fail_fast, init_distributed
from protoformer.flops import flops_per_token
from protoformer.models import GPTModel
from protoformer.parallel import ProcessGroups
from protoformer.parallel.grads import finalize_model_grads
from protoformer.parallel.random import model_parallel_manual_seed
from protoformer.recipes import gpt_layer_spec

HIDDEN, HEADS, FFN, VOCAB = 4096, 32, 11008, 32000


@dataclass(frozen=True)
class Result:
    tp: int
    sequence_parallel: bool
    step_ms: float
    tokens_per_s: float
    tflops_per_gpu: float
    peak_memory_gb: float


def _config(args: argparse.Namespace, sequence_parallel: bool) -> TransformerConfig:
    return TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        ffn_hidden_size=args.ffn,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, attention_dropout=0.0, hidden_dropout=0.0,
        params_dtype=torch.bfloat16 if args.device == "cuda" else torch.float32,
        bf16=args.device == "cuda", sequence_parallel=sequence_parallel)


def worker(args: argparse.Namespace) -> None:
    """One rank of one launch: build, warm up, time `--steps` steps, rank 0 writes JSON."""
    launch, device = init_distributed(args.device, timeout=120)
    cuda = device.type == "cuda"
    with fail_fast(launch):
        pg = ProcessGroups.from_torchrun(tp=launch.world_size) if launch.is_distributed \
            else ProcessGroups()
        model_parallel_manual_seed(0, pg.tp_rank)
        config = _config(args, args.sequence_parallel and pg.tp_size > 1)
        with torch.device(device):
            model = GPTModel(config, gpt_layer_spec(get_backend("local"), config), args.vocab,
                             args.seq, pg=pg)
        model.train()
        generator = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=generator)
        tokens = tokens.to(device)
        ids, labels = tokens[:, :-1], tokens[:, 1:]

        def step() -> None:
            loss = model(ids, labels).float().mean()
            loss.backward()
            finalize_model_grads(model, pg)
            model.zero_grad(set_to_none=True)

        for _ in range(args.warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / args.steps
        tokens_per_s = args.batch * args.seq / seconds
        flops = flops_per_token(config, args.vocab, args.seq)
        peak_bytes = torch.cuda.max_memory_allocated() if cuda else 0
        peak = torch.tensor([peak_bytes / 2**30], device=device)
        if launch.is_distributed:
            torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        result = Result(tp=pg.tp_size, sequence_parallel=config.sequence_parallel,
                        step_ms=seconds * 1e3, tokens_per_s=tokens_per_s,
                        tflops_per_gpu=tokens_per_s * flops / pg.tp_size / 1e12,
                        peak_memory_gb=float(peak.item()))
        if launch.is_rank_zero:
            Path(args.out).write_text(json.dumps(asdict(result)), encoding="utf-8")
            print(f"tp={result.tp} sp={result.sequence_parallel}: {result.step_ms:.1f} ms/step, "
                  f"{result.tokens_per_s:,.0f} tokens/s", flush=True)
    destroy_distributed()


def launch_all(args: argparse.Namespace) -> int:
    """Run one torchrun launch per (TP, SP) setting; print the table; 1 if any failed."""
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("tp_scaling: no CUDA device; this benchmark needs GPUs (or --device cpu "
                  "with a small shape for a smoke test)", file=sys.stderr)
            return 1
        gpus = torch.cuda.device_count()
        where = f"{gpus} GPU(s) ({torch.cuda.get_device_name(0)})"
    else:
        gpus = args.max_tp
        where = "CPU (gloo)"
    sizes = [tp for tp in (1, 2, 4, 8) if tp <= min(gpus, args.max_tp)]
    settings = [(tp, sp) for tp in sizes for sp in ((False,) if tp == 1 else (False, True))]
    env = dict(os.environ)
    env["NCCL_NVLS_ENABLE"] = "0"  # never NVLink multicast (see the device notes)
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    source = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH", "")) if p)
    results: list[Result] = []
    failures: list[str] = []
    deadline = time.monotonic() + args.deadline
    print(f"tp_scaling: {where}, torch {torch.__version__}; hidden={args.hidden} "
          f"heads={args.heads} ffn={args.ffn} vocab={args.vocab} layers={args.layers} "
          f"seq={args.seq} batch={args.batch}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        for tp, sp in settings:
            remaining = deadline - time.monotonic()
            if remaining < 30:
                failures.append(f"tp={tp} sp={sp}: skipped, the {args.deadline:.0f} s deadline "
                                "is reached")
                continue
            out = Path(scratch) / f"tp{tp}-sp{int(sp)}.json"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc-per-node={tp}", __file__, "--out", str(out),
                       "--device", args.device, "--hidden", str(args.hidden),
                       "--heads", str(args.heads), "--ffn", str(args.ffn),
                       "--vocab", str(args.vocab),
                       "--layers", str(args.layers), "--seq", str(args.seq),
                       "--batch", str(args.batch), "--warmup", str(args.warmup),
                       "--steps", str(args.steps)] + (["--sequence-parallel"] if sp else [])
            started = time.monotonic()
            try:
                finished = subprocess.run(command, env=env, capture_output=True, text=True,
                                          timeout=min(args.launch_timeout, remaining))
            except subprocess.TimeoutExpired as expired:
                tail = (expired.stdout or "")[-2000:] if isinstance(expired.stdout, str) else ""
                failures.append(f"tp={tp} sp={sp}: timed out after "
                                f"{time.monotonic() - started:.0f} s\n{tail}")
                continue
            if finished.returncode != 0 or not out.exists():
                failures.append(f"tp={tp} sp={sp}: exit status {finished.returncode}\n"
                                f"{(finished.stdout + finished.stderr)[-4000:]}")
                continue
            results.append(Result(**json.loads(out.read_text(encoding="utf-8"))))
            print(f"  tp={tp} sp={sp}: done in {time.monotonic() - started:.0f} s", flush=True)
    print()
    print(table(results))
    for failure in failures:
        print(f"\nFAILED {failure}", file=sys.stderr)
    return 1 if failures or not results else 0


def table(results: list[Result]) -> str:
    base = next((r.tokens_per_s for r in results if r.tp == 1), None)
    lines = ["| TP | sequence parallel | step (ms) | tokens/s | tokens/s per GPU | speedup vs "
             "TP=1 | scaling efficiency | TFLOP/s per GPU | peak memory (GiB) |",
             "| ---: | :---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        speedup = r.tokens_per_s / base if base else float("nan")
        lines.append(f"| {r.tp} | {'yes' if r.sequence_parallel else 'no'} | {r.step_ms:.1f} | "
                     f"{r.tokens_per_s:,.0f} | {r.tokens_per_s / r.tp:,.0f} | {speedup:.2f}x | "
                     f"{speedup / r.tp:.0%} | {r.tflops_per_gpu:.0f} | {r.peak_memory_gb:.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launch", action="store_true",
                        help="start one torchrun per TP size and print the table")
    parser.add_argument("--max-tp", type=int, default=4)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--heads", type=int, default=HEADS)
    parser.add_argument("--ffn", type=int, default=FFN)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--launch-timeout", type=float, default=150.0)
    parser.add_argument("--deadline", type=float, default=420.0,
                        help="stop starting launches after this many seconds overall")
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--out", default="tp_scaling_result.json")
    args = parser.parse_args()
    if args.launch:
        return launch_all(args)
    worker(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
