"""Weight initialisation: in-place normal draws (as Megatron-Core names them), and the
per-module random streams a model's parts are initialised from.

A layer receives an init method as its `init_method` (`protoformer.parallel.protocols.InitMethod`)
and applies it to the full weight before keeping its tensor-parallel slice.

Per-module streams: a model draws one seed from the default RNG (`draw_init_seed`) and builds
each of its parts (the embedding, each layer, the output layer) inside `fork_init_rng(seed,
name)`, which seeds the default generators from `(seed, name)` for the duration of the block
and then puts their state back. A part's weights therefore depend on the seed and its own
name only, not on which parts were built before it: a pipeline rank that builds only its own
layers (the others on the meta device, which draws nothing) gets exactly the weights the
one-process model has, and so does every other layout (tensor-parallel ranks draw the same
full weight and keep their slice).
"""

from __future__ import annotations

import functools
import hashlib
import math
from contextlib import AbstractContextManager

import torch

from protoformer.parallel.protocols import InitMethod
from protoformer.parallel.random import manual_seed_within

__all__ = ["draw_init_seed", "fork_init_rng", "init_method_normal", "scaled_init_method_normal"]

_SEED_LIMIT = 1 << 63  # torch generators take seeds below 2**64; keep them non-negative int64s


def init_method_normal(std: float) -> InitMethod:
    """Normal(0, `std`) initialisation of a weight, in place."""
    return functools.partial(torch.nn.init.normal_, mean=0.0, std=std)


def scaled_init_method_normal(std: float, num_layers: int) -> InitMethod:
    """Normal(0, `std / sqrt(2 * num_layers)`): for the linears that write into the residual."""
    return functools.partial(torch.nn.init.normal_, mean=0.0, std=std / math.sqrt(2.0 * num_layers))


def draw_init_seed() -> int:
    """One seed drawn from the default CPU generator, for a model's `fork_init_rng` blocks
    (the same on every rank seeded alike; two models built in a row get different ones)."""
    generator = torch.default_generator
    drawn: torch.Tensor = torch.randint(0, _SEED_LIMIT - 1, (1,), generator=generator,
                                        device="cpu")  # [1] int64
    return int(drawn.item())


def _derived_seed(seed: int, name: str) -> int:
    """A seed for part `name` of a model seeded `seed` (a stable hash, the same on every run)."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % _SEED_LIMIT


def _init_devices() -> list[str]:
    """The generators an initialisation may draw from: the CPU's, and the current CUDA
    device's when CUDA is up or is where new tensors go (`torch.device(...)` blocks)."""
    devices = ["cpu"]
    default = torch.get_default_device()
    cuda_up = torch.cuda.is_available() and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
    if default.type == "cuda" or cuda_up:
        index = default.index if default.type == "cuda" else None
        if index is None:
            index = torch.cuda.current_device()
        devices.append(f"cuda:{index}")
    return devices


def fork_init_rng(seed: int, name: str) -> AbstractContextManager[None]:
    """Draw from a stream seeded by `(seed, name)` inside the block (CPU, and the CUDA device
    new tensors go to); the default generators' states are restored afterwards."""
    return manual_seed_within(_derived_seed(seed, name), _init_devices())
