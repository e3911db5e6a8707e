"""KV-cache bytes per token per layer: multi-latent attention (MLA) vs multi-head attention (MHA).

Builds one attention layer of each kind at the same hidden size, runs a prefill through it with
an `InferenceContext`, and measures the cache the layer *allocated*: the sum of
`numel() * element_size()` over the tensors it stored in `key_value_memory_dict`, divided by
the number of token slots (`max_sequence_length * max_batch_size`). An analytic count is
printed next to it as a cross-check.

Layers compared per shape:
- MLA, latent cache (`cache_mla_latents=True`): `c_kv` and the rotated `k_pe` per token.
- MLA, expanded cache (`cache_mla_latents=False`): per-head keys `[np, qk + rope]` and values.
- MHA with `kv_channels = hidden / heads` (the "same width" multi-head layer).
- MHA with `kv_channels = v_head_dim` (same heads and head size as MLA's values).

Run: `python benchmarks/mla_kv_cache.py` (bf16 by default; `--dtype fp32` for float32).
Weights are left uninitialized (`perform_initialization=False`): only the cache size matters.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass

import torch
from torch import nn

from protoformer import MLATransformerConfig, TransformerConfig
from protoformer.backends import get_backend
from protoformer.recipes.mla import mla_self_attention_spec
from protoformer.transformer.attention import SelfAttention, SelfAttentionSubmodules
from protoformer.transformer.inference import InferenceContext
from protoformer.transformer.mla import MultiLatentAttention
from protoformer.transformer.rope import RotaryEmbedding


@dataclass(frozen=True)
class Shape:
    name: str
    hidden_size: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_head_dim: int
    qk_pos_emb_head_dim: int
    v_head_dim: int


SHAPES = [
    Shape("DeepSeek-V3", 7168, 128, 1536, 512, 128, 64, 128),
    Shape("DeepSeek-V2-Lite", 2048, 16, None, 512, 128, 64, 128),
]


@dataclass(frozen=True)
class Row:
    shape: str
    layer: str
    bytes_per_token: float
    analytic: int


def cache_bytes_per_token(context: InferenceContext, layer_number: int) -> float:
    tensors = context.key_value_memory_dict[layer_number]
    total = sum(t.numel() * t.element_size() for t in tensors)
    return total / (context.max_sequence_length * context.max_batch_size)


def prefill(layer: nn.Module, hidden: int, args: argparse.Namespace, dtype: torch.dtype,
            rotary: torch.Tensor | None = None) -> float:
    """Run one prefill with a fresh InferenceContext; return the measured cache bytes per token."""
    context = InferenceContext(max_batch_size=args.batch, max_sequence_length=args.max_seq_len)
    x = torch.randn(args.prefill, args.batch, hidden, dtype=dtype)  # [s, b, h]
    with torch.inference_mode():
        layer(x, rotary_pos_emb=rotary, inference_context=context)
    return cache_bytes_per_token(context, layer_number=1)


def measure(shape: Shape, args: argparse.Namespace, dtype: torch.dtype) -> list[Row]:
    backend = get_backend("local")
    common = {"num_layers": 1, "hidden_size": shape.hidden_size,
              "num_attention_heads": shape.num_attention_heads, "params_dtype": dtype,
              "perform_initialization": False, "add_bias_linear": False,
              "attention_dropout": 0.0, "hidden_dropout": 0.0}
    elem = torch.empty((), dtype=dtype).element_size()
    rows: list[Row] = []
    for latent in (True, False):
        config = MLATransformerConfig(
            **common, q_lora_rank=shape.q_lora_rank, kv_lora_rank=shape.kv_lora_rank,
            qk_head_dim=shape.qk_head_dim, qk_pos_emb_head_dim=shape.qk_pos_emb_head_dim,
            v_head_dim=shape.v_head_dim, cache_mla_latents=latent)
        layer = MultiLatentAttention(config, mla_self_attention_spec(backend, config),
                                     layer_number=1).eval()
        measured = prefill(layer, shape.hidden_size, args, dtype)
        if latent:
            name = "MLA, latent cache"
            analytic = (shape.kv_lora_rank + shape.qk_pos_emb_head_dim) * elem
        else:
            name = "MLA, expanded cache"
            per_head = shape.qk_head_dim + shape.qk_pos_emb_head_dim + shape.v_head_dim
            analytic = shape.num_attention_heads * per_head * elem
        rows.append(Row(shape.name, name, measured, analytic))
        del layer
    for kv_channels in sorted({shape.hidden_size // shape.num_attention_heads, shape.v_head_dim}):
        config = TransformerConfig(**common, kv_channels=kv_channels)
        submodules = SelfAttentionSubmodules(
            linear_qkv=backend.column_parallel_linear(), core_attention=backend.core_attention(),
            linear_proj=backend.row_parallel_linear())
        layer = SelfAttention(config, submodules, layer_number=1).eval()
        rotary = RotaryEmbedding(kv_channels)(args.max_seq_len).to(dtype)
        measured = prefill(layer, shape.hidden_size, args, dtype, rotary)
        analytic = 2 * shape.num_attention_heads * kv_channels * elem
        rows.append(Row(shape.name, f"MHA, {shape.num_attention_heads} heads x {kv_channels}",
                        measured, analytic))
        del layer
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--prefill", type=int, default=16, help="prompt tokens (default 16)")
    parser.add_argument("--max-seq-len", type=int, default=64, help="cache length (default 64)")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)

    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, "
          f"{args.dtype}, prefill {args.prefill} tokens, cache {args.max_seq_len} x batch "
          f"{args.batch}\n")
    print("| shape | layer | cache bytes / token / layer (measured) | analytic | ratio to MHA "
          "(h/np) | MHA (h/np) / this |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    start = time.perf_counter()
    for shape in SHAPES:
        rows = measure(shape, args, dtype)
        # The reference: MHA whose head size is hidden / heads (the first MHA row).
        mha = next(r for r in rows if r.layer.startswith("MHA")).bytes_per_token
        for row in rows:
            if row.bytes_per_token != row.analytic:
                raise RuntimeError(f"{row}: the measured cache differs from the analytic count")
            print(f"| {row.shape} | {row.layer} | {row.bytes_per_token:,.0f} | {row.analytic:,} "
                  f"| {row.bytes_per_token / mha:.3f} | {mha / row.bytes_per_token:.1f}x |")
    print(f"\ntotal {time.perf_counter() - start:.1f} s (building the layers and one prefill each)")


if __name__ == "__main__":
    main()
