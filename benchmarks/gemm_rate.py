"""The matmuls of one training step, each timed alone: rate against a dense matmul of equal FLOPs.

A `TorchDispatchMode` records every `mm` / `addmm` (shapes, strides, dtype) of one forward
and backward of protoformer's model (fused QKV and gate-up projections) and of the Hugging
Face Llama peer (separate q/k/v and gate/up), at the `--shape` of `train_step.py`. Each
distinct matmul is then replayed `--repeats` times with CUDA events: as recorded (the layout
the model feeds cuBLAS), with contiguous operands, and against a square bf16 matmul of the
same FLOPs (the dense rate of that size). Per model, the table gives count x time, TFLOP/s
and the step's total matmul time.

    python benchmarks/gemm_rate.py --shape llama3.2-1b --seq 4096 --batch 2
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable

import _peers
import torch
from _peers import add_shape_arguments, build_hf, build_protoformer, copy_weights, llama_1b_config
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

_MATMULS = {torch.ops.aten.mm.default: "mm", torch.ops.aten.mm.out: "mm.out",
            torch.ops.aten.addmm.default: "addmm", torch.ops.aten.addmm_.default: "addmm_"}

# (op, (m, k, n), strides of a, strides of b, dtype)
Key = tuple[str, tuple[int, int, int], tuple[int, ...], tuple[int, ...], torch.dtype]


class RecordMatmuls(TorchDispatchMode):
    """Counts each distinct matmul by op, sizes, operand strides and dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[Key] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = _MATMULS.get(func)
        if name is not None:
            a, b = (args[0], args[1]) if name.startswith("mm") else (args[1], args[2])
            self.seen[(name, (a.shape[0], a.shape[1], b.shape[1]), tuple(a.stride()),
                       tuple(b.stride()), a.dtype)] += 1
        return func(*args, **(kwargs or {}))


def record(step: Callable[[], None]) -> Counter[Key]:
    with RecordMatmuls() as recorder:
        step()
    return recorder.seen


def _operand(rows: int, cols: int, stride: tuple[int, ...] | None, dtype: torch.dtype) -> Tensor:
    if stride is None:
        return torch.randn(rows, cols, device="cuda", dtype=dtype)
    span = 1 + (rows - 1) * stride[0] + (cols - 1) * stride[1]
    return torch.randn(span, device="cuda", dtype=dtype).as_strided((rows, cols), stride)


def time_mm(m: int, k: int, n: int, a_stride: tuple[int, ...] | None,
            b_stride: tuple[int, ...] | None, dtype: torch.dtype, repeats: int) -> float:
    """Seconds per `a @ b` (`[m, k] @ [k, n]`) with the given operand strides."""
    a, b = _operand(m, k, a_stride, dtype), _operand(k, n, b_stride, dtype)
    out = torch.empty(m, n, device="cuda", dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        torch.mm(a, b, out=out)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def report(name: str, seen: Counter[Key], repeats: int) -> float:
    print(f"\n### {name}: {sum(seen.values())} matmuls, {len(seen)} distinct\n")
    print("| count | op | m x k x n | a strides | b strides | ms | TFLOP/s | contiguous "
          "TFLOP/s | dense same-FLOPs TFLOP/s |")
    print("| ---: | --- | --- | --- | --- | ---: | ---: | ---: | ---: |")
    total = 0.0
    for (op, (m, k, n), sa, sb, dtype), count in sorted(
            seen.items(), key=lambda item: -item[1] * item[0][1][0] * item[0][1][1] * item[0][1][2]):
        flops = 2.0 * m * k * n
        seconds = time_mm(m, k, n, sa, sb, dtype, repeats)
        contiguous = time_mm(m, k, n, None, None, dtype, repeats)
        side = max(128, round((flops / 2) ** (1 / 3) / 128) * 128)
        dense = time_mm(side, side, side, None, None, dtype, repeats)
        dense_rate = 2.0 * side**3 / dense / 1e12
        total += count * seconds
        print(f"| {count} | {op} | {m} x {k} x {n} | {sa} | {sb} | {seconds * 1e3:.3f} | "
              f"{flops / seconds / 1e12:.0f} | {flops / contiguous / 1e12:.0f} | "
              f"{dense_rate:.0f} ({side}^3) |")
    print(f"\n{name}: matmul time per step (replayed alone) {total * 1e3:.1f} ms")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gemm_rate.py needs a CUDA GPU")
    _peers.DEVICE = torch.device("cuda")
    config = llama_1b_config(args)
    print(f"card: {torch.cuda.get_device_name()}; torch {torch.__version__}; shape {args.shape}; "
          f"seq {args.seq} batch {args.batch}")
    torch.manual_seed(0)
    ours = build_protoformer(config, args.vocab, args.seq)
    hf = build_hf(config, args.vocab, args.seq)
    copy_weights(ours, hf)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device="cuda")

    def step_of(model: nn.Module, loss: Callable[[], Tensor]) -> Callable[[], None]:
        def step() -> None:
            loss().backward()
            model.zero_grad(set_to_none=True)
        return step

    totals = {}
    for name, model, loss in (
            ("protoformer", ours, lambda: ours(ids, ids, loss_reduction="mean")),
            ("hf-sdpa", hf, lambda: hf(input_ids=ids, labels=ids).loss)):
        step = step_of(model, loss)
        step()  # warm-up outside the recorder
        totals[name] = report(name, record(step), args.repeats)
        model.to("meta")  # frees the memory for the next model
        torch.cuda.empty_cache()
    print(f"\nmatmul time per step: protoformer {totals['protoformer'] * 1e3:.1f} ms, hf "
          f"{totals['hf-sdpa'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
