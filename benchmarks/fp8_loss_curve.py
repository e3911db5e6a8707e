"""FP8 against bf16 training: two runs from the same weights on the same batches, loss per step.

A small Llama-style model (`--layers`, `--hidden`, ...) learns the bytes of this repository's
own text files (Python and Markdown, byte-level tokens) for `--steps` steps with AdamW;
mixed precision (float32 master weights, bf16 autocast) for both, the second run with
`config.fp8` (torchao's float8 matmuls in every layer's linears). The batches come from one
seeded generator, so both runs see the same tokens in the same order. Losses stay on the
device until the end. Prints the mean loss of the last `--tail` steps of each run and their
relative difference, checked against `--tolerance`; `--json` writes both curves.

    python benchmarks/fp8_loss_curve.py --steps 300 --recipe tensorwise --json curves.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from protoformer import TransformerConfig
from protoformer.backends.fused import FusedSpecProvider, fused_config
from protoformer.kernels.fp8 import fp8_training_available
from protoformer.models import GPTModel
from protoformer.recipes import gpt_layer_spec


def corpus(root: Path) -> Tensor:
    """The bytes of the repository's .py and .md files, in path order, as a uint8 tensor."""
    files = sorted(p for p in root.rglob("*") if p.suffix in (".py", ".md")
                   and ".git" not in p.parts and ".whl" not in p.parts)
    data = b"\n".join(p.read_bytes() for p in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def run(args: argparse.Namespace, data: Tensor, fp8: str | None) -> list[float]:
    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=args.groups, ffn_hidden_size=args.ffn, normalization="RMSNorm",
        add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu,
        attention_dropout=0.0, hidden_dropout=0.0, bf16=True, init_method_std=0.02)
    config = dataclasses.replace(fused_config(config), fp8=fp8)  # type: ignore[arg-type]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GPTModel(config, gpt_layer_spec(FusedSpecProvider(), config), 256, args.seq)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / args.warmup_steps))
    generator = torch.Generator().manual_seed(123)
    data = data.cuda()
    losses: list[Tensor] = []
    for _ in range(args.steps):
        starts = torch.randint(0, data.numel() - args.seq - 1, (args.batch,), generator=generator)
        index = starts[:, None].cuda() + torch.arange(args.seq + 1, device="cuda")  # [b, s + 1]
        tokens = data[index]
        loss = model(tokens[:, :-1], tokens[:, 1:]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return [float(v) for v in torch.stack(losses).tolist()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--recipe", default="tensorwise", choices=("tensorwise", "rowwise"))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--tail", type=int, default=50)
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="largest accepted |fp8 - bf16| / bf16 of the tail's mean loss")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    data = corpus(Path(__file__).resolve().parent.parent)
    print(f"card: {torch.cuda.get_device_name()}; torch {torch.__version__}; float8 available: "
          f"{fp8_training_available()}; corpus {data.numel():,} bytes", flush=True)
    bf16 = run(args, data, None)
    fp8 = run(args, data, args.recipe)
    tail_bf16 = sum(bf16[-args.tail:]) / args.tail
    tail_fp8 = sum(fp8[-args.tail:]) / args.tail
    relative = abs(tail_fp8 - tail_bf16) / tail_bf16
    for step in (0, 49, 99, 149, 199, 249, args.steps - 1):
        if step < args.steps:
            print(f"step {step + 1}: bf16 {bf16[step]:.4f}  fp8 {fp8[step]:.4f}")
    verdict = "within" if relative <= args.tolerance else "OUTSIDE"
    print(f"mean loss of the last {args.tail} steps: bf16 {tail_bf16:.4f}, fp8 ({args.recipe}) "
          f"{tail_fp8:.4f}; relative difference {relative:.2%}, {verdict} the tolerance "
          f"{args.tolerance:.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"bf16": bf16, "fp8": fp8, "recipe": args.recipe,
                                               "args": vars(args)}))


if __name__ == "__main__":
    main()
