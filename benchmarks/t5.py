"""Encoder-decoder speed: protoformer's `T5Model` vs Hugging Face `T5ForConditionalGeneration`.

One process builds a random-init T5 of t5-small's shape (d_model 512, 6 + 6 layers, 8 heads of
64, d_ff 2048, vocabulary 32128; `--variant v1.1` for the gated-GeLU MLP), converts it with
`protoformer.interop.t5_from_hf`, checks that the logits agree, then times

- the full forward (encoder over `--source` tokens, decoder over `--target` tokens), and
- greedy generation of `--new` tokens from one source sequence (transformers `generate` with
  its KV cache, protoformer `generate_seq2seq`), end-of-sequence disabled so both emit all.

Each repeat alternates the two models so that outside load affects both alike; medians are
reported. Float32 on CPU; on CUDA pass `--dtype bfloat16` for the usual inference precision.

    python benchmarks/t5.py [--device cpu] [--threads 2] [--batch 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers

import protoformer
from protoformer.generation import generate_seq2seq
from protoformer.interop import t5_from_hf

VARIANTS = {"t5": {"feed_forward_proj": "relu"},
            "v1.1": {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    function()
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--variant", default="t5", choices=tuple(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--source", type=int, default=256)
    parser.add_argument("--target", type=int, default=64)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    config = transformers.T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048,
                                   num_layers=6, num_heads=8, dropout_rate=0.0,
                                   decoder_start_token_id=0, **VARIANTS[args.variant])
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(config).eval()
    ours = t5_from_hf(hf).eval().to(device=device, dtype=dtype)
    hf = hf.to(device=device, dtype=dtype)
    hf.generation_config.eos_token_id = None
    generator = torch.Generator().manual_seed(1)
    source = torch.randint(2, 32128, (args.batch, args.source), generator=generator).to(device)
    target = torch.randint(2, 32128, (args.batch, args.target), generator=generator).to(device)

    with torch.inference_mode():
        expected = hf(input_ids=source, decoder_input_ids=target).logits.float()
        got = ours(source, target).float()
    diff = float((got - expected).abs().max())
    scale = float(expected.abs().max())

    def hf_forward() -> object:
        return hf(input_ids=source, decoder_input_ids=target).logits

    def our_forward() -> object:
        return ours(source, target)

    def hf_generate() -> object:
        return hf.generate(source[:1], max_new_tokens=args.new, do_sample=False)

    def our_generate() -> object:
        return generate_seq2seq(ours, source[0], args.new, greedy=True)

    results: dict[str, list[float]] = {name: [] for name in
                                       ("hf_forward", "our_forward", "hf_generate", "our_generate")}
    functions = {"hf_forward": hf_forward, "our_forward": our_forward,
                 "hf_generate": hf_generate, "our_generate": our_generate}
    with torch.inference_mode():
        for function in functions.values():
            for _ in range(args.warmup):
                timed(function, device)
        for _ in range(args.repeats):
            for name, function in functions.items():
                results[name].append(timed(function, device))
        same_tokens = hf_generate().tolist()[0][1:] == our_generate()  # type: ignore[attr-defined]

    median = {name: statistics.median(times) for name, times in results.items()}
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device {card} ({args.device}, {args.threads} threads), {args.dtype}, torch "
          f"{torch.__version__}, transformers {transformers.__version__}, protoformer "
          f"{protoformer.__version__}")
    print(f"T5 {args.variant}, t5-small shape, batch {args.batch}, source {args.source}, target "
          f"{args.target}; max |logit diff| {diff:.2e} (logits up to {scale:.1f}); greedy tokens "
          f"identical: {same_tokens}")
    forward_ratio = median["hf_forward"] / median["our_forward"]
    print(f"forward:  transformers {median['hf_forward'] * 1e3:8.1f} ms   protoformer "
          f"{median['our_forward'] * 1e3:8.1f} ms   speed-up {forward_ratio:.2f}x")
    hf_rate, our_rate = args.new / median["hf_generate"], args.new / median["our_generate"]
    print(f"generate: transformers {hf_rate:8.1f} tok/s  protoformer {our_rate:8.1f} tok/s  "
          f"speed-up {our_rate / hf_rate:.2f}x  ({args.new} new tokens, batch 1)")


if __name__ == "__main__":
    main()
