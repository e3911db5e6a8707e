"""Soft-capped / sliding-window attention on CUDA: FlexAttention (SDPAttention's path there)
against the explicit math path (DotProductAttention), forward + backward, at a Gemma-2-2B
attention shape (8 query heads, 4 key/value groups, head size 256, cap 50, window 4096).

    python benchmarks/flex_attention.py --seq 4096 8192 --batch 2
"""

from __future__ import annotations

import argparse

import torch

from protoformer import TransformerConfig
from protoformer.transformer.core_attention import DotProductAttention, SDPAttention
from protoformer.transformer.enums import AttnMaskType


def _time(core: torch.nn.Module, seq: int, batch: int, args: argparse.Namespace) -> tuple[float, float]:
    """(milliseconds per forward + backward, peak GiB)."""
    q, k, v = (torch.randn(seq, batch, n, args.head_dim, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for n in (args.heads, args.groups, args.groups))
    for _ in range(3):
        core(q, k, v, None).sum().backward()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.iters):
        core(q, k, v, None).sum().backward()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / args.iters, torch.cuda.max_memory_allocated() / (1 << 30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=256)
    parser.add_argument("--cap", type=float, default=50.0)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    config = TransformerConfig(num_layers=1, hidden_size=args.heads * args.head_dim,
                               num_attention_heads=args.heads, num_query_groups=args.groups,
                               kv_channels=args.head_dim, attention_dropout=0.0,
                               attn_logit_softcapping=args.cap)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, batch {args.batch}, "
          f"np {args.heads} ng {args.groups} hn {args.head_dim}, cap {args.cap}")
    for window in (None, args.window):
        for seq in args.seq:
            row = [f"seq {seq:6d} window {window!s:>5}"]
            for name, cls in (("flex", SDPAttention), ("math", DotProductAttention)):
                core = cls(config, 1, AttnMaskType.causal, window_size=window)
                try:
                    ms, gib = _time(core, seq, args.batch, args)
                    row.append(f"{name} {ms:8.2f} ms {gib:6.2f} GiB")
                except torch.OutOfMemoryError:
                    row.append(f"{name} out of memory")
                torch.cuda.empty_cache()
            print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
