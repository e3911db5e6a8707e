"""Will it fit, checked: train a scaled-down preset a few steps and compare the measured memory
with `protoformer.memory.estimate_layout_memory` (what `protoformer inspect --tp/--pp/--fsdp`
prints).

On CUDA (one GPU, no parallelism: the per-GPU formula at tp = pp = dp = 1): bf16 autocast,
AdamW, `--steps` steps; prints the estimate's rows next to the measured parameter, gradient and
optimizer bytes (summed over the tensors) and `torch.cuda.max_memory_allocated` against the
estimate's total. The target is within 10%. On the CPU (`--device cpu`) only the parameter,
gradient and optimizer parts are compared (there is no allocator peak to read).

    python benchmarks/memory_fit.py                       # CUDA: llama3-8b shape, 4 layers
    python benchmarks/memory_fit.py --device cpu --preset tiny --layers 4 --seq 128
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from protoformer.backends import get_backend
from protoformer.memory import ParallelLayout, estimate_layout_memory
from protoformer.models import GPTModel
from protoformer.recipes import get_preset


def _gib(value: float) -> str:
    return f"{value / (1 << 30):8.3f} GiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--layers", type=int, default=4, help="layers kept (scaled-down shape)")
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--recompute", choices=("none", "full"), default="none")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    preset = get_preset(args.preset)
    config = dataclasses.replace(preset.config(), num_layers=args.layers,
                                 recompute_granularity="full" if args.recompute == "full"
                                 else None)
    spec = preset.layer_spec(get_backend("local"), config)
    with torch.device(device):
        model = GPTModel(config, spec, preset.vocab_size, max(preset.max_sequence_length, args.seq),
                         share_embeddings_and_output_weights=preset.tie_embeddings)
    layout = ParallelLayout(micro_batch_size=args.micro_batch_size, seq_len=args.seq,
                            recompute=args.recompute)
    estimate = estimate_layout_memory(model, config, preset.vocab_size, layout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    for _ in range(args.steps):
        tokens = torch.randint(0, preset.vocab_size, (args.micro_batch_size, args.seq + 1),
                               generator=generator).to(device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(tokens[:, :-1], tokens[:, 1:]).mean()
        loss.backward()
        optimizer.step()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                if p.grad is not None)
    moments = sum(value.numel() * value.element_size() for state in optimizer.state.values()
                  for value in state.values() if isinstance(value, torch.Tensor)
                  and value.dim() > 0)
    print(f"{args.preset} with {args.layers} layers, micro-batch {args.micro_batch_size} x seq "
          f"{args.seq}, recompute {args.recompute}, on {device} (torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "") + ")")
    print(f"{'':<34}{'estimate':>13}{'measured':>13}")
    for name, guess, seen in (("parameters", estimate.parameter_bytes, params),
                              ("gradients", estimate.gradient_bytes, grads),
                              ("optimizer state", estimate.optimizer_bytes, moments)):
        print(f"{name:<34}{_gib(guess):>13}{_gib(seen):>13}")
    if device.type != "cuda":
        print("(the CPU has no allocator peak: activations are compared on CUDA only)")
        return 0
    peak = torch.cuda.max_memory_allocated(device)
    print(f"{'activations':<34}{_gib(estimate.activation_bytes):>13}"
          f"{_gib(peak - params - grads - moments):>13}  (peak minus the states)")
    print(f"{'total / max_memory_allocated':<34}{_gib(estimate.total_bytes):>13}{_gib(peak):>13}"
          f"  ratio {estimate.total_bytes / peak:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
