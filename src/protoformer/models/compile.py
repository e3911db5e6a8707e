"""`compile_layers`: regional `torch.compile` of a model's transformer layers (torchtitan's
`compile` option), with a one-time warning and eager layers where compilation cannot work.

Each `TransformerLayer` runs its computation through one compiled function shared by the
stack (so a 16-layer model compiles one graph, not 16); the embedding, the final norm and
the output layer with its fused loss stay as they are. With the fused backend the norms,
SwiGLU, RoPE, residual adds and casts inside a layer become Inductor kernels, while core
attention runs the fused SDPA kernels outside the graph (see `protoformer.backends.fused`).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from protoformer.transformer.compile import CompileMode, CompileOptions, compiled_function
from protoformer.transformer.layer import TransformerLayer

__all__ = ["compile_available", "compile_layers"]

_probed: dict[tuple[str, CompileOptions], str | None] = {}  # (device type, options) -> error


def _probe_step(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(x @ w).square().mean()


def compile_available(device: torch.device, options: CompileOptions | None = None) -> str | None:
    """None when `options` (default: Inductor) compile a small forward and backward on
    `device` in this process, else why not (the compiler's error, one line). Probed once per
    device type and options."""
    options = options if options is not None else CompileOptions()
    key = (device.type, options)
    if key not in _probed:
        try:
            x = torch.randn(8, 16, device=device)
            w = torch.randn(16, 16, device=device, requires_grad=True)
            torch.autograd.grad(compiled_function(_probe_step, options)(x, w), [w])
            _probed[key] = None
        except Exception as error:  # no working compiler toolchain, an unknown backend, ...
            message = f"{type(error).__name__}: {error}".splitlines()[0]
            _probed[key] = message[:300]
    return _probed[key]


def compile_layers(model: nn.Module, *, backend: str = "inductor", mode: CompileMode | None = None,
                   dynamic: bool | None = None, fullgraph: bool = False) -> int:
    """Compile every `TransformerLayer` of `model` in place; returns how many were compiled.

    The arguments are `torch.compile`'s. Training and evaluation forward passes run compiled
    (recompiled once when a size or the training flag changes; ahead of a long run the first
    steps are slower); decoding with a KV cache stays eager. Where compilation cannot work on
    the model's device (no compiler toolchain, an unknown backend) this warns once, leaves
    the layers eager and returns 0, so a run goes on at eager speed. `fullgraph=True`
    refuses graph breaks; the fused backend's core attention is one, by design.
    """
    layers = [m for m in model.modules() if isinstance(m, TransformerLayer)]
    if not layers:
        return 0
    options = CompileOptions(backend=backend, mode=mode, dynamic=dynamic, fullgraph=fullgraph)
    device = next(layers[0].parameters()).device
    problem = compile_available(device, options)
    if problem is not None:
        warnings.warn(f"compile_layers: torch.compile does not work here ({problem}); the "
                      f"{len(layers)} layers run eagerly", stacklevel=2)
        return 0
    for layer in layers:
        layer.compile_options = options
    return len(layers)
