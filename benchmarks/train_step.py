"""Training-step throughput: protoformer (fused backend) against Hugging Face Llama, same weights.

One process builds a Llama-style model twice, protoformer's `GPTModel` from `gpt_layer_spec`
with the fused backend (`FusedSpecProvider` + `fused_config`: Triton RoPE, liger RMSNorm and
SwiGLU, SDPA limited to cuDNN / flash / efficient kernels in `--attention-kernels` order, fused
linear + cross-entropy) and `transformers.LlamaForCausalLM` with
`attn_implementation="sdpa"`, from the same config, copies protoformer's weights into the
Hugging Face model (checking that the logits agree), and times full training steps of each:
forward with the loss, backward, `torch.optim.AdamW(fused=True)` step, all in bfloat16
weights. It reports tokens/s, model TFLOP/s (`protoformer.flops.flops_per_token`), MFU
against a peak (989 TFLOP/s: dense bf16 of an H100 SXM, also an H200's), the peak allocated
memory, and the ratio. Each model is timed alone (the other waits on the CPU); the step time
is the median of `--steps` steps after `--warmup` steps, with `torch.cuda.synchronize()`.

    python benchmarks/train_step.py --seq 2048 4096 --batch 8 4 --ours-extra-batch 16 8
    python benchmarks/train_step.py --seq 4096 --batch 4 --profile prof.txt

If Hugging Face runs out of memory at `--batch`, it is retried at half the batch (and
protoformer timed there too), so the ratio is always taken at a batch both fit.

Needs a CUDA GPU and transformers.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protoformer import TransformerConfig
from protoformer.backends.fused import FusedSpecProvider, fused_config
from protoformer.flops import flops_per_token
from protoformer.interop.hf import to_hf
from protoformer.models import GPTModel
from protoformer.recipes import gpt_layer_spec

PEAK_BF16_TFLOPS = 989.0  # H100 SXM dense bf16 (H200: the same chip, same peak)
DEVICE = torch.device("cuda")  # `--device cpu` (tiny shapes) only smoke-tests this script


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def empty_cache() -> None:
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Result:
    model: str
    seq: int
    batch: int
    step_ms: float
    tokens_per_s: float
    tflops: float
    mfu: float
    peak_mem_gib: float
    status: str = "ok"


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The model-shape flags `llama_1b_config` reads (defaults: Llama-3.2-1B)."""
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=8192)


def llama_1b_config(args: argparse.Namespace) -> TransformerConfig:
    """Llama-3.2-1B shapes (untied output layer): 16 layers, hidden 2048, GQA 32/8, SwiGLU 8192."""
    return TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=args.groups, ffn_hidden_size=args.ffn, normalization="RMSNorm",
        layernorm_epsilon=1e-5, add_bias_linear=False, gated_linear_unit=True,
        activation_func=F.silu, attention_dropout=0.0, hidden_dropout=0.0,
        rotary_base=500000.0, params_dtype=torch.bfloat16, bf16=True,
    )


def build_protoformer(config: TransformerConfig, vocab: int, max_len: int,
                      kernels: tuple[str, ...]) -> GPTModel:
    backend = FusedSpecProvider(attention_kernels=kernels)  # type: ignore[arg-type]
    fast = fused_config(config)
    with DEVICE:
        model = GPTModel(fast, gpt_layer_spec(backend, fast), vocab, max_len)
    return model


def build_hf(config: TransformerConfig, vocab: int, max_len: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        hidden_size=config.hidden_size, intermediate_size=config.ffn_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.query_groups, head_dim=config.head_dim, vocab_size=vocab,
        max_position_embeddings=max_len, rms_norm_eps=config.layernorm_epsilon,
        rope_theta=config.rotary_base, tie_word_embeddings=False, attention_bias=False,
        mlp_bias=False, hidden_act="silu", attention_dropout=0.0,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,  # random weights: no stop token
    )
    with DEVICE:
        model: nn.Module = LlamaForCausalLM._from_config(
            hf_config, attn_implementation="sdpa", dtype=torch.bfloat16)
    return model


def copy_weights(ours: GPTModel, hf: nn.Module) -> str:
    state = to_hf(ours)
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in state.items()},
                                             strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    if missing or unexpected:
        raise RuntimeError(f"weight copy incomplete: missing {missing}, unexpected {unexpected}")
    return "protoformer.interop.hf.to_hf"


@torch.no_grad()
def logits_agreement(ours: GPTModel, hf: nn.Module, vocab: int) -> float:
    ids = torch.randint(0, vocab, (2, min(256, ours.max_sequence_length)), device=DEVICE)
    a = ours(ids).float()
    b = hf(input_ids=ids).logits.float()
    return float((a - b).norm() / b.norm())


def time_steps(step: Callable[[], None], warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    return times


def make_step(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], vocab: int,
              seq: int, batch: int) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    """One training step on fixed random tokens: loss, backward, fused AdamW, zero grads."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=DEVICE.type == "cuda")
    ids = torch.randint(0, vocab, (batch, seq), device=DEVICE)
    labels = torch.randint(0, vocab, (batch, seq), device=DEVICE)

    def step() -> None:
        loss = loss_fn(ids, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def release(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    if optimizer is not None:
        optimizer.state.clear()
    model.zero_grad(set_to_none=True)
    empty_cache()


def bench(name: str, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
          config: TransformerConfig, vocab: int, seq: int, batch: int,
          args: argparse.Namespace) -> Result:
    model.train()
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    optimizer: torch.optim.Optimizer | None = None
    try:
        step, optimizer = make_step(model, loss_fn, vocab, seq, batch)
        times = time_steps(step, args.warmup, args.steps)
    except torch.OutOfMemoryError:
        release(model, optimizer)
        return Result(name, seq, batch, 0.0, 0.0, 0.0, 0.0, 0.0, status="OOM")
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else 0.0
    release(model, optimizer)
    step_s = statistics.median(times)
    tokens_per_s = batch * seq / step_s
    tflops = tokens_per_s * flops_per_token(config, vocab, seq) / 1e12
    return Result(name, seq, batch, step_s * 1e3, tokens_per_s, tflops, tflops / PEAK_BF16_TFLOPS,
                  peak)


def profile_summary(loss_fn: Callable[[Tensor, Tensor], Tensor], model: nn.Module, vocab: int,
                    seq: int, batch: int, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    step, optimizer = make_step(model, loss_fn, vocab, seq, batch)
    step()
    synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        synchronize()
    release(model, optimizer)
    averages = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            return str(averages.table(sort_by=key, row_limit=rows))
        except (AttributeError, KeyError, ValueError):
            continue
    return str(averages.table(row_limit=rows))


def markdown(results: Iterable[Result]) -> str:
    lines = ["| model | seq | batch | step ms | tokens/s | TFLOP/s | MFU | peak GiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        if r.status != "ok":
            lines.append(f"| {r.model} | {r.seq} | {r.batch} | {r.status} | | | | |")
            continue
        lines.append(f"| {r.model} | {r.seq} | {r.batch} | {r.step_ms:.1f} | "
                     f"{r.tokens_per_s:,.0f} | {r.tflops:.1f} | {r.mfu:.1%} | {r.peak_mem_gib:.1f} |")
    return "\n".join(lines)


def run_seq(config: TransformerConfig, seq: int, batch: int, extra: int,
            kernels: tuple[str, ...], profile_to: str | None,
            args: argparse.Namespace) -> list[Result]:
    """Both models at one sequence length (and protoformer alone at `extra` if nonzero)."""
    results: list[Result] = []
    torch.manual_seed(0)
    ours = build_protoformer(config, args.vocab, seq, kernels)
    print(f"seq {seq}: fused kernels available: {FusedSpecProvider().kernel_report()}", flush=True)
    hf: nn.Module | None = None
    if not args.skip_hf:
        hf = build_hf(config, args.vocab, seq)
        how = copy_weights(ours, hf)
        print(f"seq {seq}: weights copied by {how}; relative logits difference "
              f"{logits_agreement(ours, hf, args.vocab):.2e} (bf16)", flush=True)
        hf.to("cpu")

    def ours_loss(ids: Tensor, labels: Tensor) -> Tensor:
        return ours(ids, labels).mean()

    for size in (batch, extra) if extra else (batch,):
        results.append(bench("protoformer", ours, ours_loss, config, args.vocab, seq, size, args))
        print(markdown(results[-1:]), flush=True)
    if hf is None:
        return results
    hf_model = hf

    def hf_loss(ids: Tensor, labels: Tensor) -> Tensor:
        return hf_model(input_ids=ids, labels=labels).loss

    ours.to("cpu")
    hf.to(DEVICE)
    hf_batch = batch
    results.append(bench("hf-llama-sdpa", hf, hf_loss, config, args.vocab, seq, hf_batch, args))
    print(markdown(results[-1:]), flush=True)
    while results[-1].status == "OOM" and hf_batch > 1:
        # Compare at the largest batch Hugging Face fits; time protoformer there too.
        hf_batch //= 2
        results.append(bench("hf-llama-sdpa", hf, hf_loss, config, args.vocab, seq, hf_batch,
                             args))
        print(markdown(results[-1:]), flush=True)
    if hf_batch != batch and results[-1].status == "ok":
        hf.to("cpu")
        ours.to(DEVICE)
        results.append(bench("protoformer", ours, ours_loss, config, args.vocab, seq, hf_batch,
                             args))
        print(markdown(results[-1:]), flush=True)
        ours.to("cpu")
        hf.to(DEVICE)
    if profile_to:
        tables = [f"## protoformer seq {seq} batch {batch}\n"]
        hf.to("cpu")
        ours.to(DEVICE)
        tables.append(profile_summary(ours_loss, ours, args.vocab, seq, batch, args.profile_rows))
        ours.to("cpu")
        hf.to(DEVICE)
        tables.append(f"\n## hf-llama-sdpa seq {seq} batch {batch}\n")
        tables.append(profile_summary(hf_loss, hf, args.vocab, seq, batch, args.profile_rows))
        with open(profile_to, "w") as handle:
            handle.write("\n".join(tables))
        print(f"profiler tables written to {profile_to}", flush=True)
    hf.to("cpu")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 4],
                        help="batch per --seq entry (both models use it)")
    parser.add_argument("--ours-extra-batch", type=int, nargs="*", default=[],
                        help="also time protoformer alone at these batches (per --seq entry)")
    add_shape_arguments(parser)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--attention-kernels", default="cudnn,flash,efficient",
                        help="FusedSpecProvider(attention_kernels=...), in order of preference")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--profile", default=None,
                        help="write torch.profiler top-kernel tables (last --seq) to this file")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--json", default=None, help="append results as JSON lines here")
    parser.add_argument("--device", default="cuda", help="cpu only to smoke-test the script")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if len(args.batch) != len(args.seq):
        parser.error("give one --batch per --seq")
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train_step.py needs a CUDA GPU (or --device cpu for a smoke test)")

    card = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    print(f"card: {card}; torch {torch.__version__}; peak for MFU {PEAK_BF16_TFLOPS} TFLOP/s",
          flush=True)
    config = llama_1b_config(args)
    kernels = tuple(args.attention_kernels.split(","))
    results: list[Result] = []
    for index, (seq, batch) in enumerate(zip(args.seq, args.batch, strict=True)):
        extra = args.ours_extra_batch[index] if index < len(args.ours_extra_batch) else 0
        profile_to = args.profile if index == len(args.seq) - 1 else None
        results.extend(run_seq(config, seq, batch, extra, kernels, profile_to, args))
        empty_cache()

    print(f"\n## {card}, bf16, vocab {args.vocab}\n")
    print(markdown(results))
    for seq in args.seq:
        same = [r for r in results if r.seq == seq and r.status == "ok"]
        ours_best = [r for r in same if r.model == "protoformer"]
        theirs = [r for r in same if r.model == "hf-llama-sdpa"]
        if ours_best and theirs:
            hf_best = max(theirs, key=lambda r: r.tokens_per_s)
            same_batch = [r for r in ours_best if r.batch == hf_best.batch]
            if same_batch:
                print(f"seq {seq}: protoformer / HF tokens/s at batch {hf_best.batch}: "
                      f"{same_batch[0].tokens_per_s / hf_best.tokens_per_s:.2f}x")
            best = max(ours_best, key=lambda r: r.tokens_per_s)
            print(f"seq {seq}: best protoformer (batch {best.batch}) / best HF (batch "
                  f"{hf_best.batch}): {best.tokens_per_s / hf_best.tokens_per_s:.2f}x")
    if args.json:
        with open(args.json, "a") as handle:
            for r in results:
                handle.write(json.dumps({"card": card, **asdict(r)}) + "\n")


if __name__ == "__main__":
    main()
