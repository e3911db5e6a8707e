"""Weight initialisation methods: in-place normal draws, as Megatron-Core names them.

A layer receives one as its `init_method` (`protoformer.parallel.protocols.InitMethod`) and
applies it to the full weight before keeping its tensor-parallel slice.
"""

from __future__ import annotations

import functools
import math

import torch

from protoformer.parallel.protocols import InitMethod

__all__ = ["init_method_normal", "scaled_init_method_normal"]


def init_method_normal(std: float) -> InitMethod:
    """Normal(0, `std`) initialisation of a weight, in place."""
    return functools.partial(torch.nn.init.normal_, mean=0.0, std=std)


def scaled_init_method_normal(std: float, num_layers: int) -> InitMethod:
    """Normal(0, `std / sqrt(2 * num_layers)`): for the linears that write into the residual."""
    return functools.partial(torch.nn.init.normal_, mean=0.0, std=std / math.sqrt(2.0 * num_layers))
