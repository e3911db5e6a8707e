"""Training-step throughput: protoformer (fused backend) against the practical Hugging Face peers.

Every model runs in this one process with the same weights (protoformer's, copied with
`protoformer.interop.hf.to_hf`), the same random tokens, bf16 weights and a fused AdamW step:

- `protoformer`: `GPTModel` with `FusedSpecProvider` and `fused_config` (Triton RoPE,
  liger-kernel RMSNorm / SwiGLU, fused SDPA, fused linear + cross-entropy), the mean loss
  from `loss_reduction="mean"` (`--per-token-loss`: per-token losses averaged outside);
- `protoformer-compiled`: the same after `protoformer.models.compile_layers` (regional
  `torch.compile`: inside each layer Inductor fuses the norms, SwiGLU, RoPE, residual adds
  and casts; core attention stays the fused SDPA kernel, the loss stays ours);
- `protoformer-per-token`: the same with per-token losses averaged outside (on CUDA with
  liger-kernel: liger's fused linear cross-entropy, logits recomputed in backward) instead
  of the mean loss (gradients in forward, no host synchronisation);
- `hf-sdpa`: `transformers.LlamaForCausalLM`, `attn_implementation="sdpa"`;
- `hf-compiled`: the same with each decoder layer `.compile()`d;
- `hf-liger`: the same after `liger_kernel.transformers.apply_liger_kernel_to_llama` (RoPE,
  RMSNorm, SwiGLU and fused linear cross-entropy), applied last (it patches the class).

Each model is timed at every `--batch` (larger batches are skipped after an out-of-memory;
`--compiled-batch` limits the compiled ones, which recompile for each new batch);
a step is forward with the loss, backward, AdamW, zero grads; `--steps` steps run back to
back after `--warmup` and are timed with CUDA events around them (one synchronisation, as a
training loop that never waits on the host would run). MFU is given under both FLOP
conventions: the PaLM / torchtitan count (`6 N + 12 L h s`, `flops_per_token`) and the
causal count (attention halved), against 989 TFLOP/s (dense bf16, H100 SXM and H200).

    python benchmarks/train_step.py --shape tinyllama --seq 4096 --batch 2 8
    python benchmarks/train_step.py --shape llama3.2-1b --seq 4096 --batch 2 4 8 --profile prof.txt

The models are built in `_peers.py`. Needs a CUDA GPU and transformers (and liger-kernel for `hf-liger`); `--device cpu` with a
tiny `--layers/--hidden/...` shape only smoke-tests the script.
"""

from __future__ import annotations

import argparse
import json
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass

import _peers
import torch
from _peers import (
    add_shape_arguments,
    build_hf,
    build_protoformer,
    compile_protoformer,
    empty_cache,
    llama_1b_config,
    load_hf_state,
    make_hf_peer,
    synchronize,
)
from torch import Tensor, nn

from protoformer import TransformerConfig
from protoformer.backends.fused import FusedSpecProvider
from protoformer.flops import flops_per_token
from protoformer.interop.hf import to_hf
from protoformer.models import GPTModel

PEAK_BF16_TFLOPS = 989.0  # H100 SXM dense bf16 (H200: the same chip, same peak)
MODELS = ("protoformer", "protoformer-compiled", "protoformer-per-token", "hf-sdpa",
          "hf-compiled", "hf-liger")


@dataclass
class Result:
    model: str
    seq: int
    batch: int
    step_ms: float = 0.0
    tokens_per_s: float = 0.0
    mfu_palm: float = 0.0
    mfu_causal: float = 0.0
    peak_mem_gib: float = 0.0
    status: str = "ok"



def make_step(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], vocab: int,
              seq: int, batch: int) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    """One training step on fixed random tokens: loss, backward, fused AdamW, zero grads.

    Nothing in it waits on the host (the loss stays on the device)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=_peers.DEVICE.type == "cuda")
    generator = torch.Generator(device=_peers.DEVICE).manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), device=_peers.DEVICE, generator=generator)
    labels = torch.randint(0, vocab, (batch, seq), device=_peers.DEVICE, generator=generator)

    def step() -> None:
        loss = loss_fn(ids, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def timed_steps(step: Callable[[], None], warmup: int, steps: int) -> float:
    """Seconds per step over `steps` back-to-back steps (after `warmup`)."""
    for _ in range(warmup):
        step()
    synchronize()
    if _peers.DEVICE.type != "cuda":
        import time
        start_s = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - start_s) / steps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / steps


def release(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    if optimizer is not None:
        optimizer.state.clear()
    model.zero_grad(set_to_none=True)
    empty_cache()


def bench(name: str, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
          config: TransformerConfig, vocab: int, seq: int, batch: int,
          args: argparse.Namespace) -> Result:
    model.train()
    if _peers.DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    optimizer: torch.optim.Optimizer | None = None
    try:
        step, optimizer = make_step(model, loss_fn, vocab, seq, batch)
        step_s = timed_steps(step, args.warmup, args.steps)
    except torch.OutOfMemoryError:
        release(model, optimizer)
        return Result(name, seq, batch, status="OOM")
    peak = torch.cuda.max_memory_allocated() / 2**30 if _peers.DEVICE.type == "cuda" else 0.0
    release(model, optimizer)
    tokens_per_s = batch * seq / step_s
    palm = tokens_per_s * flops_per_token(config, vocab, seq) / 1e12 / PEAK_BF16_TFLOPS
    causal = tokens_per_s * flops_per_token(config, vocab, seq, causal=True) / 1e12 \
        / PEAK_BF16_TFLOPS
    return Result(name, seq, batch, step_s * 1e3, tokens_per_s, palm, causal, peak)


def profile_summary(name: str, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
                    vocab: int, seq: int, batch: int, rows: int) -> str:
    """Top kernels by device time over two steps, and the GPU's idle share of their wall time
    (and of the span from their first to their last kernel)."""
    from torch.profiler import ProfilerActivity, profile

    step, optimizer = make_step(model, loss_fn, vocab, seq, batch)
    step()
    synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(2):
            step()
        end.record()
        synchronize()
    release(model, optimizer)
    wall_us = start.elapsed_time(end) * 1e3
    busy_us = 0.0
    intervals: list[tuple[float, float]] = []
    for event in prof.events():
        if str(getattr(event, "device_type", "")).endswith("CUDA") and event.time_range:
            intervals.append((event.time_range.start, event.time_range.end))
    merged = _merge(intervals)
    for begin, finish in merged:
        busy_us += finish - begin
    # Between the first and the last kernel: the steady state, without the start from an
    # empty queue (after the synchronisation, under the profiler's slower host).
    span_us = merged[-1][1] - merged[0][0] if merged else 0.0
    averages = prof.key_averages()
    table = ""
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            table = str(averages.table(sort_by=key, row_limit=rows))
            break
        except (AttributeError, KeyError, ValueError):
            continue
    idle = max(0.0, 1.0 - busy_us / wall_us) if wall_us > 0 else 0.0
    span_idle = max(0.0, 1.0 - busy_us / span_us) if span_us > 0 else 0.0
    return (f"## {name} seq {seq} batch {batch}: 2 steps {wall_us / 1e3:.1f} ms, GPU busy "
            f"{busy_us / 1e3:.1f} ms, idle {idle:.1%} (first to last kernel: "
            f"{span_idle:.1%})\n\n{table}\n")


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for begin, finish in sorted(intervals):
        if merged and begin <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], finish))
        else:
            merged.append((begin, finish))
    return merged


def markdown(results: list[Result]) -> str:
    lines = ["| model | seq | batch | step ms | tokens/s | MFU (PaLM 6N+12Lhs) | MFU (causal) "
             "| peak GiB |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        if r.status != "ok":
            lines.append(f"| {r.model} | {r.seq} | {r.batch} | {r.status} | | | | |")
            continue
        lines.append(f"| {r.model} | {r.seq} | {r.batch} | {r.step_ms:.1f} | "
                     f"{r.tokens_per_s:,.0f} | {r.mfu_palm:.1%} | {r.mfu_causal:.1%} | "
                     f"{r.peak_mem_gib:.1f} |")
    return "\n".join(lines)


def ratios(results: list[Result]) -> list[str]:
    """protoformer's tokens/s over each peer's, at equal batch and best against best."""
    ours = {r.batch: r for r in results if r.model == "protoformer" and r.status == "ok"}
    lines: list[str] = []
    if not ours:
        return lines
    best_ours = max(ours.values(), key=lambda r: r.tokens_per_s)
    for peer in sorted({r.model for r in results} - {"protoformer"}):
        theirs = {r.batch: r for r in results if r.model == peer and r.status == "ok"}
        if not theirs:
            continue
        same = ", ".join(f"batch {b}: {ours[b].tokens_per_s / t.tokens_per_s:.2f}x"
                         for b, t in sorted(theirs.items()) if b in ours)
        best = max(theirs.values(), key=lambda r: r.tokens_per_s)
        lines.append(f"protoformer / {peer}: {same}; best (batch {best_ours.batch}) / best "
                     f"(batch {best.batch}): {best_ours.tokens_per_s / best.tokens_per_s:.2f}x")
    return lines


def run_model(name: str, make: Callable[[], tuple[nn.Module, Callable[[Tensor, Tensor], Tensor]]],
              config: TransformerConfig, seq: int, args: argparse.Namespace,
              results: list[Result], profiles: list[str]) -> None:
    """Build one model, time it at every batch (until an out-of-memory), maybe profile it."""
    try:
        model, loss_fn = make()
    except Exception as error:  # a peer that cannot be built (missing package) is reported
        traceback.print_exc()
        results.append(Result(name, seq, 0, status=f"unavailable: {error!r}"[:120]))
        return
    batches = args.batch
    if name.endswith("compiled") and args.compiled_batch:
        # Each new batch size recompiles (a minute or more): time compiled models at fewer.
        batches = [b for b in args.batch if b in args.compiled_batch]
    for batch in batches:
        try:
            results.append(bench(name, model, loss_fn, config, args.vocab, seq, batch, args))
        except Exception as error:  # a compile or kernel failure is reported, the run goes on
            traceback.print_exc()
            results.append(Result(name, seq, batch, status=f"failed: {error!r}"[:120]))
        print(markdown(results[-1:]), flush=True)
        if results[-1].status != "ok":
            break
    if args.profile and name in args.profile_models and _peers.DEVICE.type == "cuda":
        batch = args.profile_batch or args.batch[0]
        try:
            profiles.append(profile_summary(name, model, loss_fn, args.vocab, seq, batch,
                                            args.profile_rows))
            print(profiles[-1].splitlines()[0], flush=True)
        except torch.OutOfMemoryError:
            release(model, None)
    del model
    empty_cache()


def run_seq(config: TransformerConfig, seq: int, args: argparse.Namespace,
            profiles: list[str]) -> list[Result]:
    results: list[Result] = []
    kernels = tuple(args.attention_kernels.split(","))
    torch.manual_seed(0)
    ours = build_protoformer(config, args.vocab, seq, kernels)
    print(f"seq {seq}: fused kernels: {FusedSpecProvider().kernel_report()}", flush=True)
    hf_state = {k: v.detach().to("cpu", copy=True) for k, v in to_hf(ours).items()}
    check_ids = torch.randint(0, args.vocab, (2, min(256, seq)), device=_peers.DEVICE)
    with torch.no_grad():
        ours.eval()
        reference = ours(check_ids).float()
    ours_holder: list[GPTModel] = [ours]  # the first protoformer run takes this one
    del ours

    def ours_loss(model: nn.Module, per_token: bool) -> Callable[[Tensor, Tensor], Tensor]:
        if per_token:  # per-token losses, averaged outside (the logits recomputed)
            return lambda ids, labels: model(ids, labels).mean()
        return lambda ids, labels: model(ids, labels, loss_reduction="mean")

    def make_ours(compiled: bool, per_token: bool
                  ) -> tuple[nn.Module, Callable[[Tensor, Tensor], Tensor]]:
        if ours_holder:
            model = ours_holder.pop()
        else:
            torch.manual_seed(0)  # the same weights again
            model = build_protoformer(config, args.vocab, seq, kernels)
        if compiled:
            print(f"seq {seq}: protoformer-compiled: {compile_protoformer(model)} layers "
                  "compiled (compile_layers)", flush=True)
        return model, ours_loss(model, per_token or args.per_token_loss)

    def hf_loss(model: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
        return lambda ids, labels: model(input_ids=ids, labels=labels).loss

    def make_hf(kind: str) -> tuple[nn.Module, Callable[[Tensor, Tensor], Tensor]]:
        model = build_hf(config, args.vocab, seq)
        load_hf_state(model, {k: v.to(_peers.DEVICE) for k, v in hf_state.items()})
        model.eval()
        with torch.no_grad():
            got = model(input_ids=check_ids).logits.float()
        print(f"seq {seq}: {kind}: logits vs protoformer, relative difference "
              f"{float((got - reference).norm() / reference.norm()):.2e} (bf16)", flush=True)
        return make_hf_peer(model, kind), hf_loss(model)

    for name in args.models:
        if name.startswith("protoformer"):
            compiled, per_token = name == "protoformer-compiled", name.endswith("per-token")
            run_model(name, lambda c=compiled, p=per_token: make_ours(c, p), config, seq, args,
                      results, profiles)
        else:
            ours_holder.clear()
            run_model(name, lambda name=name: make_hf(name), config, seq, args, results,
                      profiles)
        empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[4096])
    parser.add_argument("--batch", type=int, nargs="+", default=[2, 8],
                        help="every model is timed at each batch (ascending)")
    parser.add_argument("--models", default="protoformer,hf-sdpa,hf-compiled,hf-liger",
                        help=f"comma-separated, from {', '.join(MODELS)}, in this order")
    parser.add_argument("--per-token-loss", action="store_true",
                        help="protoformer returns per-token losses (averaged outside) instead "
                             "of loss_reduction='mean'")
    parser.add_argument("--compiled-batch", type=int, nargs="*", default=None,
                        help="time the compiled models only at these of the --batch values "
                             "(each new batch recompiles); default all")
    add_shape_arguments(parser)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--attention-kernels", default="cudnn,flash,efficient",
                        help="FusedSpecProvider(attention_kernels=...), in order of preference")
    parser.add_argument("--profile", default=None,
                        help="write torch.profiler tables (and GPU idle share) to this file")
    parser.add_argument("--profile-models", default="protoformer,hf-liger")
    parser.add_argument("--profile-batch", type=int, default=None)
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--json", default=None, help="append results as JSON lines here")
    parser.add_argument("--device", default="cuda", help="cpu only to smoke-test the script")
    args = parser.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown --models {unknown}; choose from {', '.join(MODELS)}")
    args.profile_models = args.profile_models.split(",")
    args.batch = sorted(args.batch)
    _peers.DEVICE = torch.device(args.device)
    if _peers.DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train_step.py needs a CUDA GPU (or --device cpu for a smoke test)")
    import transformers

    card = torch.cuda.get_device_name() if _peers.DEVICE.type == "cuda" else "cpu"
    config = llama_1b_config(args)
    print(f"card: {card}; torch {torch.__version__}; transformers {transformers.__version__}; "
          f"shape {args.shape} ({config.num_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_attention_heads}/{config.query_groups} heads, ffn {config.ffn_size}, "
          f"vocab {args.vocab}); peak for MFU {PEAK_BF16_TFLOPS} TFLOP/s", flush=True)
    results: list[Result] = []
    profiles: list[str] = []
    for seq in args.seq:
        results.extend(run_seq(config, seq, args, profiles))
    print(f"\n## {card}, {args.shape}, bf16, vocab {args.vocab}\n")
    print(markdown(results))
    for seq in args.seq:
        for line in ratios([r for r in results if r.seq == seq]):
            print(f"seq {seq}: {line}")
    if args.profile and profiles:
        with open(args.profile, "w") as handle:
            handle.write("\n".join(profiles))
        print(f"profiler tables written to {args.profile}")
    if args.json:
        with open(args.json, "a") as handle:
            for r in results:
                handle.write(json.dumps({"card": card, "shape": args.shape, **asdict(r)}) + "\n")


if __name__ == "__main__":
    main()
