"""Regional compilation: a transformer layer's forward pass through `torch.compile`.

`CompileOptions` (set on a `TransformerLayer` by `protoformer.models.compile_layers`) names
how to compile; `compiled_function` holds one compiled function per (function, options), so
every layer of a stack shares one compiled graph (its parameters are the graph's inputs, not
constants), as torchtitan's per-block compilation does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["CompileMode", "CompileOptions", "compiled_function"]

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
"""`torch.compile`'s modes."""


@dataclass(frozen=True)
class CompileOptions:
    """How `torch.compile` compiles a layer (the arguments of `torch.compile`, same names).

    `backend`: "inductor" (fused Triton / C++ kernels) or another registered backend, e.g.
    "aot_eager" (traced but not fused; a check of tracing alone). `mode`: None or one of
    `CompileMode`. `dynamic`: None lets torch mark a size dynamic after it changes once.
    """

    backend: str = "inductor"
    mode: CompileMode | None = None
    dynamic: bool | None = None
    fullgraph: bool = False


@functools.cache
def compiled_function(function: Callable[..., Tensor], options: CompileOptions
                      ) -> Callable[..., Tensor]:
    """`function` compiled with `options`; the same object for the same arguments."""
    return torch.compile(  # pyright: ignore[reportUnknownMemberType]  # its backend parameter's Callable is untyped
        function, backend=options.backend, mode=options.mode, dynamic=options.dynamic,
        fullgraph=options.fullgraph)
