"""FP8 training throughput: protoformer's own bf16 step against `config.fp8` (torchao float8).

A stack of Llama-3-8B-shaped layers (hidden 4096, 32 heads / 8 key-value groups, SwiGLU
14336; `--layers` of them) with the fused backend, bf16 weights, fused AdamW, one step =
forward with the loss, backward, optimizer step, zero grads on fixed random tokens. The
variants differ only in `config.fp8` and in whether each `TransformerLayer` is compiled
(`layer.compile()`: torchao's scaling and casting kernels fuse only under torch.compile).
The output layer stays in bf16 (as torchtitan leaves it); `--vocab` keeps it small so the
layers dominate. Timing: CUDA events around `--steps` back-to-back steps after `--warmup`.

    python benchmarks/fp8_step.py --layers 8 --seq 4096 --batch 2

Needs a GPU with float8 matmuls (H100/H200) and torchao (`pip install protoformer[fp8]`).
"""

from __future__ import annotations

import argparse
import dataclasses
import traceback

import torch
import torch.nn.functional as F
from torch import Tensor

from protoformer import TransformerConfig
from protoformer.backends.fused import FusedSpecProvider, fused_config
from protoformer.flops import flops_per_token
from protoformer.kernels.fp8 import fp8_training_available
from protoformer.models import GPTModel
from protoformer.recipes import gpt_layer_spec

PEAK_BF16_TFLOPS = 989.0


def build(args: argparse.Namespace, fp8: str | None, compiled: bool) -> GPTModel:
    config = TransformerConfig(
        num_layers=args.layers, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
        ffn_hidden_size=14336, normalization="RMSNorm", layernorm_epsilon=1e-5,
        add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu,
        attention_dropout=0.0, hidden_dropout=0.0, rotary_base=500000.0,
        params_dtype=torch.bfloat16, bf16=True)
    config = dataclasses.replace(fused_config(config), fp8=fp8)  # type: ignore[arg-type]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GPTModel(config, gpt_layer_spec(FusedSpecProvider(), config), args.vocab,
                         args.seq)
    if compiled:
        for layer in model.decoder.layers:
            layer.compile()
    return model


def time_model(model: GPTModel, args: argparse.Namespace) -> tuple[float, float]:
    """(seconds per step, first step's loss)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    generator = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device="cuda", generator=generator)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), device="cuda",
                           generator=generator)
    losses: list[Tensor] = []

    def step() -> None:
        loss = model(ids, labels).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.steps):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / args.steps, float(losses[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--variants", default="bf16,bf16+compile,tensorwise+compile,"
                        "rowwise+compile,tensorwise")
    args = parser.parse_args()
    print(f"card: {torch.cuda.get_device_name()}; torch {torch.__version__}; float8 available: "
          f"{fp8_training_available()}; {args.layers} Llama-3-8B layers, seq {args.seq}, batch "
          f"{args.batch}, vocab {args.vocab}", flush=True)
    rows: list[tuple[str, float, float, float]] = []
    for variant in args.variants.split(","):
        recipe, _, compiled = variant.partition("+")
        fp8 = None if recipe == "bf16" else recipe
        try:
            model = build(args, fp8, compiled == "compile")
            step_s, loss = time_model(model, args)
        except Exception:  # report and go on with the other variants
            traceback.print_exc()
            continue
        config = model.config
        del model
        torch.cuda.empty_cache()
        tokens = args.batch * args.seq / step_s
        tflops = tokens * flops_per_token(config, args.vocab, args.seq) / 1e12
        rows.append((variant, step_s * 1e3, tokens, loss))
        print(f"{variant}: {step_s * 1e3:.1f} ms/step, {tokens:,.0f} tokens/s, {tflops:.0f} "
              f"TFLOP/s (bf16-equivalent, PaLM count), first loss {loss:.4f}", flush=True)
    base = {name: tokens for name, _, tokens, _ in rows}
    print("\n| variant | step ms | tokens/s | vs bf16 eager | vs bf16 compiled | first-step loss |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, ms, tokens, loss in rows:
        eager = f"{tokens / base['bf16']:.2f}x" if "bf16" in base else ""
        comp = f"{tokens / base['bf16+compile']:.2f}x" if "bf16+compile" in base else ""
        print(f"| {name} | {ms:.1f} | {tokens:,.0f} | {eager} | {comp} | {loss:.4f} |")


if __name__ == "__main__":
    main()
