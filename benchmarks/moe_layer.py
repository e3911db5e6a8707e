"""One MoE layer, forward + backward: protoformer's `MoELayer` against transformers'
`Qwen3MoeSparseMoeBlock` with the same weights, in the same process (GPU, bf16).

protoformer's layer is built by the fused backend (grouped GEMMs, the experts' activation x
routing weight compiled into one pass) and, for comparison, by the local backend.

Qwen3-30B-A3B-like sizes by default: hidden 2048, 128 experts, top-8 (softmax, top-k
renormalised), expert ffn 768 (SwiGLU), 16k tokens. transformers' block runs under every
`config._experts_implementation` this version accepts ("eager", "batched_mm", "grouped_mm");
the fastest is the baseline. Reported: median ms per forward+backward (input and every
weight get gradients), tokens/s, and the expert matmuls' effective TFLOP/s (their FLOPs,
forward 6*N*h*f and backward twice that with N = tokens*k, over the whole layer's time), the
grouped GEMMs alone on the same rows, the outputs' agreement, and a torch.profiler table of
the protoformer layer.

    python benchmarks/moe_layer.py                 # the issue's configuration
    python benchmarks/moe_layer.py --tokens 4096   # smaller
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protoformer import TransformerConfig
from protoformer.backends import get_backend
from protoformer.recipes.moe import moe_spec
from protoformer.transformer.moe import GroupedLinear, GroupedMLP, MoELayer, TopKRouter
from protoformer.transformer.moe.experts import grouped_matmul


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--device", default="cuda", help="cpu: a small smoke run of this script")
    return parser.parse_args()


def time_ms(step: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of `step` (CUDA events, after `warmup` calls)."""
    for _ in range(warmup):
        step()
    if not torch.cuda.is_available():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def build_ours(args: argparse.Namespace, backend: str = "fused") -> MoELayer:
    config = TransformerConfig(
        num_layers=1, hidden_size=args.hidden, num_attention_heads=16,
        num_moe_experts=args.experts, moe_router_topk=args.topk, moe_ffn_hidden_size=args.ffn,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        params_dtype=torch.bfloat16, bf16=True, hidden_dropout=0.0, attention_dropout=0.0)
    return MoELayer(config, moe_spec(get_backend(backend), config)).to(args.device)


def build_hf(args: argparse.Namespace, ours: MoELayer) -> nn.Module:
    from transformers.models.qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = Qwen3MoeConfig(hidden_size=args.hidden, num_experts=args.experts,
                            num_experts_per_tok=args.topk, moe_intermediate_size=args.ffn,
                            norm_topk_prob=True, hidden_act="silu")
    with torch.device(args.device):
        block = Qwen3MoeSparseMoeBlock(config).to(torch.bfloat16)
    router, experts = ours.router, ours.experts
    assert isinstance(router, TopKRouter) and isinstance(experts, GroupedMLP)
    fc1, fc2 = experts.linear_fc1, experts.linear_fc2
    assert isinstance(fc1, GroupedLinear) and isinstance(fc2, GroupedLinear)
    with torch.no_grad():  # the same weights: HF's [E, 2f, h] gate|up and [E, h, f] layouts are ours
        block.gate.weight.copy_(router.weight)
        block.experts.gate_up_proj.copy_(fc1.weight)
        block.experts.down_proj.copy_(fc2.weight)
    return block


def fwd_bwd(module: nn.Module, x: Tensor, grad: Tensor, *, seq_first: bool) -> Callable[[], Tensor]:
    def step() -> Tensor:
        for parameter in module.parameters():
            parameter.grad = None
        inp = x.detach().requires_grad_()
        out = module(inp if seq_first else inp.transpose(0, 1))
        out = out[0] if isinstance(out, tuple) else out
        out = out if seq_first else out.transpose(0, 1)
        out.backward(grad)
        return out
    return step


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("moe_layer benchmark: needs a CUDA GPU (or --device cpu for a smoke run); skipped")
        return
    import transformers

    torch.manual_seed(0)
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"card: {card}  torch {torch.__version__}  "
          f"transformers {transformers.__version__}")
    tokens, k, h, f = args.tokens, args.topk, args.hidden, args.ffn
    rows = tokens * k
    expert_flops = 3 * 6 * rows * h * f  # fwd (fc1 2*N*h*2f + fc2 2*N*f*h) + bwd (2x)
    print(f"tokens {tokens}, hidden {h}, experts {args.experts}, top-{k}, ffn {f}: "
          f"{rows} routed rows, expert matmuls {expert_flops / 1e12:.2f} TFLOP per fwd+bwd")

    ours = build_ours(args, "fused")
    hf = build_hf(args, ours)
    ours_local = build_ours(args, "local")
    ours_local.load_state_dict(ours.state_dict())
    x = torch.randn(tokens, 1, h, device=args.device, dtype=torch.bfloat16)  # [s, b, h]
    grad = torch.randn_like(x) * 1e-2

    with torch.no_grad():
        ours_out = ours(x)[0].float()
        hf_out = hf(x.transpose(0, 1))
        hf_out = (hf_out[0] if isinstance(hf_out, tuple) else hf_out).transpose(0, 1).float()
    rel = float((ours_out - hf_out).norm() / hf_out.norm())
    print(f"outputs: relative L2 difference ours vs transformers (bf16) = {rel:.2e}")

    results: dict[str, float] = {}
    for impl in ("eager", "batched_mm", "grouped_mm"):
        try:
            hf.experts.config._experts_implementation = impl
            results[f"transformers {impl}"] = time_ms(fwd_bwd(hf, x, grad, seq_first=False), args.repeats)
        except Exception as error:  # a version without this implementation
            print(f"transformers {impl}: not run ({type(error).__name__}: {str(error)[:120]})")
    results["protoformer MoELayer local"] = time_ms(fwd_bwd(ours_local, x, grad, seq_first=True),
                                                    args.repeats)
    results["protoformer MoELayer"] = time_ms(fwd_bwd(ours, x, grad, seq_first=True), args.repeats)
    fused_out = fwd_bwd(ours, x, grad, seq_first=True)().detach().float()
    local_out = fwd_bwd(ours_local, x, grad, seq_first=True)().detach().float()
    grads = {name: p.grad for name, p in ours.named_parameters()}
    worst = max(float((grads[name] - p.grad).norm() / p.grad.norm())
                for name, p in ours_local.named_parameters() if p.grad is not None)
    print(f"fused vs local backend: output rel. L2 {float((fused_out - local_out).norm() / local_out.norm()):.1e}, "
          f"worst weight-gradient rel. L2 {worst:.1e} (bf16)")

    baseline_name = min((n for n in results if n.startswith("transformers")), key=results.__getitem__,
                        default=None)
    print(f"\n{'implementation':28s} {'ms fwd+bwd':>10s} {'tokens/s':>12s} {'expert TFLOP/s':>15s}")
    for name, ms in results.items():
        print(f"{name:28s} {ms:10.2f} {tokens / ms * 1e3:12.0f} {expert_flops / ms / 1e9:15.0f}")
    if baseline_name is not None:
        print(f"speed-up over {baseline_name}: {results[baseline_name] / results['protoformer MoELayer']:.2f}x")

    # The grouped GEMMs alone (fc1, act, fc2 fwd+bwd) on rows already grouped by expert.
    experts = ours.experts
    assert isinstance(experts, GroupedMLP)
    fc1, fc2 = experts.linear_fc1, experts.linear_fc2
    assert isinstance(fc1, GroupedLinear) and isinstance(fc2, GroupedLinear)
    counts = torch.bincount(torch.randint(0, args.experts, (rows,), device=args.device),
                            minlength=args.experts)
    grouped_x = torch.randn(rows, h, device=args.device, dtype=torch.bfloat16)
    grouped_grad = torch.randn(rows, h, device=args.device, dtype=torch.bfloat16)

    def gemms_only() -> None:
        for parameter in (fc1.weight, fc2.weight):
            parameter.grad = None
        inp = grouped_x.detach().requires_grad_()
        up = grouped_matmul(inp, fc1.weight, counts)
        down = grouped_matmul(up[:, :f] * up[:, f:], fc2.weight, counts)
        down.backward(grouped_grad)

    gemm_ms = time_ms(gemms_only, args.repeats)
    print(f"grouped GEMMs alone (fc1 + fc2, fwd+bwd, one multiply between): {gemm_ms:.2f} ms = "
          f"{expert_flops / gemm_ms / 1e9:.0f} TFLOP/s")

    from torch.profiler import ProfilerActivity, profile

    step = fwd_bwd(ours, x, grad, seq_first=True)
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if args.device == "cuda":
            torch.cuda.synchronize()
    print("\nprotoformer MoELayer, 3 x fwd+bwd, by self CUDA time:")
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            print(prof.key_averages().table(sort_by=key, row_limit=args.profile_rows))
            break
        except Exception as error:  # the key's name differs across torch releases
            print(f"(sort by {key}: {error})")


if __name__ == "__main__":
    main()
