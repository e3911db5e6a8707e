"""Will it fit, checked: run a scaled-down preset and compare what it holds with
`protoformer.memory.estimate_layout_memory` (what `protoformer inspect --tp/--pp/--fsdp` prints).

The estimate is per GPU for one layout; this script checks it at tp = pp = dp = 1 with the
local backend and the precision the estimate assumes (`config.bf16`: float32 parameters,
bfloat16 autocast inside the model, `compute_bytes = 2`), for one micro-batch:

* activations, measured on any device (the CPU included) over one forward pass:
  - "alive after forward": every storage an op made during the forward (seen by a
    `TorchDispatchMode`) that is still alive when the forward has returned, i.e. what the
    graph keeps for backward, the layer inputs full recomputation keeps included;
  - "saved for backward": the distinct storages (`untyped_storage().data_ptr()`) packed by
    `torch.autograd.graph.saved_tensors_hooks` (without recomputation the two agree; with
    non-reentrant recomputation the checkpoint's own hooks hide the layers' tensors);
  both without the parameters' own storages and without autocast's bfloat16 copies of the
  parameters (printed apart: they are weight copies, not activations);
* parameters, gradients and AdamW state: exact bytes after one optimizer step (`--no-step`
  skips the backward and the step for shapes whose states do not fit the machine);
* on CUDA also `torch.cuda.max_memory_allocated` against the estimate's total.

The estimate's activation row for `--recompute full` also adds one layer's full activations
(its recomputation in backward); the forward measurement cannot see that transient, so the
ratio is printed against the estimate's part held after forward as well.

    python benchmarks/memory_fit.py --device cpu --preset tiny --seq 256 --micro-batch-size 4
    python benchmarks/memory_fit.py --device cpu --layers 2 --seq 512 --no-step   # llama3-8b
    python benchmarks/memory_fit.py                 # CUDA: llama3-8b shape, 4 layers, 1 x 4096
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import saved_tensors_hooks
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from protoformer.backends import get_backend
from protoformer.memory import ParallelLayout, activation_bytes_per_layer, estimate_layout_memory
from protoformer.models import GPTModel
from protoformer.recipes import get_preset


@dataclasses.dataclass(frozen=True)
class ForwardMemory:
    """Bytes one forward pass leaves for backward (see the module docstring)."""

    alive: int  # storages made in forward, alive after it (no parameters, no weight casts)
    saved: int  # distinct storages packed for backward (same exclusions)
    weight_casts: int  # autocast's copies of parameters still alive after forward


class _Allocations(TorchDispatchMode):
    """Every storage an op's output lives in (one weak reference per storage address)."""

    def __init__(self, parameter_storages: set[int]) -> None:
        super().__init__()
        self.parameter_storages = parameter_storages
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}  # address: (ref, bytes)
        self.casts: set[int] = set()  # storages of autocast's copies of parameters

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        cast = (func is torch.ops.aten._to_copy.default and isinstance(args[0], Tensor)
                and args[0].untyped_storage().data_ptr() in self.parameter_storages)
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, Tensor):
                continue
            storage = tensor.untyped_storage()
            address = storage.data_ptr()
            if address == 0 or address in self.parameter_storages:
                continue
            known = self.storages.get(address)
            if known is None or known[0].expired():  # a freed address reused by a new storage
                self.storages[address] = (StorageWeakRef(storage), storage.nbytes())
                self.casts.discard(address)
            if cast:
                self.casts.add(address)
        return out


def measure_forward(model: nn.Module, tokens: Tensor, labels: Tensor) -> tuple[Tensor, ForwardMemory]:
    """The mean loss of one training forward of `model` and the bytes it holds for backward."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    allocations = _Allocations(parameter_storages)
    with allocations, saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(tokens, labels, loss_reduction="mean")
    alive = {address: size for address, (ref, size) in allocations.storages.items()
             if not ref.expired()}
    casts = sum(size for address, size in alive.items() if address in allocations.casts)
    held = sum(size for address, size in alive.items() if address not in allocations.casts)
    saved_bytes = sum(size for address, size in saved.items() if address not in allocations.casts)
    return loss, ForwardMemory(alive=held, saved=saved_bytes, weight_casts=casts)


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int, int]:
    """Exact parameter, gradient and AdamW moment bytes (the scalar `step` left out)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                if p.grad is not None)
    moments = sum(value.numel() * value.element_size() for state in optimizer.state.values()
                  for value in state.values() if isinstance(value, Tensor) and value.dim() > 0)
    return params, grads, moments


def _mib(value: float) -> str:
    return f"{value / (1 << 20):10.2f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--layers", type=int, default=4, help="layers kept (scaled-down shape)")
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--recompute", choices=("none", "full"), default="none")
    parser.add_argument("--no-step", action="store_true",
                        help="forward only: no backward, no AdamW step (states not measured)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    preset = get_preset(args.preset)
    config = dataclasses.replace(preset.config(), num_layers=args.layers, bf16=True,
                                 recompute_granularity="full" if args.recompute == "full"
                                 else None)
    spec = preset.layer_spec(get_backend("local"), config)
    torch.manual_seed(0)
    with torch.device(device):
        model = GPTModel(config, spec, preset.vocab_size, max(preset.max_sequence_length, args.seq),
                         share_embeddings_and_output_weights=preset.tie_embeddings)
    model.train()
    # torch's rms_norm is one fused kernel on CUDA only; elsewhere it also saves the
    # normalized float32 input (the estimate counts it when told).
    layout = ParallelLayout(micro_batch_size=args.micro_batch_size, seq_len=args.seq,
                            recompute=args.recompute, composite_rms_norm=device.type != "cuda")
    estimate = estimate_layout_memory(model, config, preset.vocab_size, layout)
    # The part of the activation estimate held from forward to backward (full recompute adds
    # one layer's recomputed activations in backward on top, a transient forward cannot see).
    held_estimate = estimate.activation_bytes
    if args.recompute == "full":
        held_estimate -= activation_bytes_per_layer(config, dataclasses.replace(
            layout, recompute="none"))
    generator = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, preset.vocab_size, (args.micro_batch_size, args.seq + 1),
                           generator=generator).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loss, forward = measure_forward(model, tokens[:, :-1], tokens[:, 1:])
    print(f"{args.preset} with {args.layers} layers, micro-batch {args.micro_batch_size} x seq "
          f"{args.seq}, recompute {args.recompute}, local backend, float32 parameters + bf16 "
          f"autocast, on {device} (torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "") + ")")
    print(f"{'':<40}{'estimate':>14}{'measured':>14}  ratio")
    rows: list[tuple[str, int, int]] = [
        ("activations held after forward", held_estimate, forward.alive),
        ("  (saved_tensors_hooks)", held_estimate, forward.saved)]
    print(f"{'autocast bf16 weight copies (not est.)':<40}{'':>14}{_mib(forward.weight_casts):>14}")
    if not args.no_step:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        loss.backward()
        optimizer.step()
        params, grads, moments = state_bytes(model, optimizer)
        rows += [("parameters", estimate.parameter_bytes, params),
                 ("gradients", estimate.gradient_bytes, grads),
                 ("optimizer state (AdamW m, v)", estimate.optimizer_bytes, moments)]
    for name, guess, seen in rows:
        print(f"{name:<40}{_mib(guess):>14}{_mib(seen):>14}  {guess / max(seen, 1):.3f}")
    print(f"{'activations (estimate, inspect row)':<40}{_mib(estimate.activation_bytes):>14}")
    if device.type == "cuda" and not args.no_step:
        peak = torch.cuda.max_memory_allocated(device)
        print(f"{'total / max_memory_allocated':<40}{_mib(estimate.total_bytes):>14}"
              f"{_mib(peak):>14}  {estimate.total_bytes / peak:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
