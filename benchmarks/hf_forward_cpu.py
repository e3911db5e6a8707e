"""Forward-pass time on CPU: protoformer vs Hugging Face transformers, same Llama weights.

One process builds a random-init `LlamaForCausalLM` (about 40M parameters: hidden 512, 8
layers, 8 query / 4 key-value heads, SwiGLU 1408, vocabulary 16000), converts it with
`protoformer.interop.from_hf`, checks that the logits agree, then times full forwards
(float32, `torch.inference_mode`, no KV cache) of both models. Each measurement alternates
the two models so that load from other processes affects both alike; the median of the
repeats is reported.

    python benchmarks/hf_forward_cpu.py [--threads 2] [--repeats 10] [--warmup 3]
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import protoformer
from protoformer.interop import from_hf

SHAPES = ((1, 512), (4, 256))  # (batch, sequence)


def build_hf_model(attn_implementation: str) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=16000, hidden_size=512, intermediate_size=1408,
                         num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=1024, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.config._attn_implementation = attn_implementation
    return model.eval()


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"),
                        help="transformers attention implementation (default sdpa)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    hf_model = build_hf_model(args.attn)
    ours = from_hf(hf_model).eval()
    parameters = sum(p.numel() for p in ours.parameters())
    print(f"torch {torch.__version__}, protoformer {protoformer.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"float32, transformers attention {args.attn!r}")
    print(f"model: Llama, {parameters / 1e6:.1f}M parameters")

    generator = torch.Generator().manual_seed(0)
    print("| batch x seq | transformers median (min), ms | protoformer median (min), ms "
          "| protoformer / transformers, median (min) | max abs logit diff |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for batch, length in SHAPES:
        ids = torch.randint(0, hf_model.config.vocab_size, (batch, length), generator=generator)
        with torch.inference_mode():
            difference = (hf_model(ids).logits - ours(ids)).abs().max().item()
            for _ in range(args.warmup):
                hf_model(ids)
                ours(ids)
            theirs_times: list[float] = []
            our_times: list[float] = []
            for _ in range(args.repeats):
                theirs_times.append(timed(functools.partial(hf_model, ids)))
                our_times.append(timed(functools.partial(ours, ids)))
        theirs_ms = statistics.median(theirs_times) * 1e3
        ours_ms = statistics.median(our_times) * 1e3
        theirs_min, ours_min = min(theirs_times) * 1e3, min(our_times) * 1e3
        print(f"| {batch} x {length} | {theirs_ms:.1f} ({theirs_min:.1f}) | {ours_ms:.1f} "
              f"({ours_min:.1f}) | {ours_ms / theirs_ms:.3f} ({ours_min / theirs_min:.3f}) "
              f"| {difference:.2e} |")


if __name__ == "__main__":
    main()
