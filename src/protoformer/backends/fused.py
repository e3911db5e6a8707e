"""`FusedSpecProvider`: the general layer kinds with fused GPU kernels, in the same typed slots.

Each builder here subclasses its local counterpart, keeps its constructor (so it satisfies
the same Builder protocol, checked statically by the return types below and at runtime by
`check_builder`) and replaces only `forward` on CUDA tensors:

| kind | on CUDA | elsewhere |
| --- | --- | --- |
| RMSNorm | liger-kernel's Triton RMSNorm (float32 math) | `RMSNorm` |
| LayerNorm | `F.layer_norm` on the input dtype (float32 accumulation inside) | `LayerNorm` |
| core attention | SDPA restricted to the flash / cuDNN / memory-efficient kernels | `SDPAttention` |
| gated SiLU (SwiGLU) | liger-kernel's fused gate-up SwiGLU | `Activation` |
| MoE experts' activation x routing weight | one `torch.compile`d (Inductor/Triton) pass, forward and backward | `ExpertActivation` |
| linears | the local tensor-parallel linears; with `config.fp8`, float8 matmuls (torchao) | the same, in the compute dtype |

Two fusions are not slots of a layer spec, because the layer itself calls them: the rotary
embedding (`config.apply_rope_fusion`: `protoformer.kernels.fused_apply_rotary_pos_emb`, a
Triton kernel) and the output layer with the loss (`config.cross_entropy_loss_fusion`:
`protoformer.kernels.fused_linear_cross_entropy`, never materializing the logits).
`fused_config(config)` switches both on.

Without a GPU, or without liger-kernel (`pip install protoformer[liger]`), every builder
runs the local implementation: the backend constructs and runs anywhere, so CPU tests
exercise its wiring.

Inside a layer compiled by `protoformer.models.compile_layers` (regional `torch.compile`),
the norms, SwiGLU and RoPE take their plain PyTorch math, which Inductor fuses with the
residual adds and casts around them (Dynamo cannot trace liger's kernels), while core
attention stays outside the graph and runs the fused SDPA kernels exactly as in eager mode.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from protoformer.backends.local import LocalSpecProvider
from protoformer.config import TransformerConfig
from protoformer.kernels import fused_rms_norm, fused_swiglu, liger_available, triton_available
from protoformer.kernels.fp8 import fp8_linear, fp8_training_available
from protoformer.parallel.groups import ProcessGroups
from protoformer.parallel.layers import ColumnParallelLinear, RowParallelLinear
from protoformer.parallel.protocols import ColumnParallelLinearBuilder, RowParallelLinearBuilder
from protoformer.transformer.core_attention import SDPAttention
from protoformer.transformer.enums import AttnMaskType
from protoformer.transformer.interfaces import AttentionTypeName, CoreAttentionBuilder
from protoformer.transformer.mlp import Activation, ActivationBuilder
from protoformer.transformer.moe.experts import ExpertActivation
from protoformer.transformer.moe.protocols import ExpertActivationBuilder
from protoformer.transformer.norm import LayerNorm, LayerNormBuilder, RMSNorm

__all__ = [
    "AttentionKernel",
    "Fp8ColumnParallelLinear",
    "Fp8RowParallelLinear",
    "FusedActivation",
    "FusedExpertActivation",
    "FusedLayerNorm",
    "FusedRMSNorm",
    "FusedSDPAttention",
    "FusedSpecProvider",
    "fused_config",
]

AttentionKernel = Literal["flash", "cudnn", "efficient"]
"""A fused SDPA kernel: FlashAttention-2, cuDNN's attention, or the memory-efficient kernel."""

_SDPA_BACKENDS: dict[str, SDPBackend] = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}
DEFAULT_ATTENTION_KERNELS: tuple[AttentionKernel, ...] = ("flash", "cudnn", "efficient")

# `sdpa_kernel(..., set_priority=True)` (the list order is the preference) is newer than
# torch 2.4; without it the dispatcher's own order among the allowed kernels applies.
_SDPA_HAS_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters
_HALF_DTYPES = (torch.float16, torch.bfloat16)


class Fp8ColumnParallelLinear(ColumnParallelLinear):
    """`ColumnParallelLinear` whose matmuls run in float8 when `config.fp8` names a recipe.

    Float8 applies on GPUs with float8 matmuls and torchao installed
    (`protoformer.kernels.fp8.fp8_linear`); elsewhere, and with `config.fp8=None`, this is
    `ColumnParallelLinear` exactly. Deferred weight gradients (`delay_wgrad_compute`) keep
    the compute-dtype path.
    """

    def _linear(self, input_: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        recipe = self.config.fp8
        if recipe is None or self.config.delay_wgrad_compute or not input_.is_cuda:
            return super()._linear(input_, weight, bias)
        return fp8_linear(input_, weight, bias, recipe)


class Fp8RowParallelLinear(RowParallelLinear):
    """`RowParallelLinear` whose matmuls run in float8 when `config.fp8` names a recipe
    (the same rules as `Fp8ColumnParallelLinear`)."""

    def _linear(self, input_: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        recipe = self.config.fp8
        if recipe is None or self.config.delay_wgrad_compute or not input_.is_cuda:
            return super()._linear(input_, weight, bias)
        return fp8_linear(input_, weight, bias, recipe)


class FusedRMSNorm(RMSNorm):
    """`RMSNorm` computed by one fused kernel on CUDA (liger-kernel), in float32 as the reference."""

    def forward(self, x: Tensor) -> Tensor:
        """`[..., hidden_size]` -> the same shape and dtype."""
        if not torch.compiler.is_compiling() and x.is_cuda and x.dim() > 0 \
                and x.shape[-1] == self.hidden_size and liger_available() \
                and not self.zero_centered_gamma:
            return fused_rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class FusedLayerNorm(LayerNorm):
    """`LayerNorm` through PyTorch's fused kernel on the input dtype (it accumulates in float32).

    The reference upcasts the input and the parameters to float32 first (two extra passes
    over the activations); the CUDA kernel computes the statistics and the affine transform
    in float32 internally and rounds once, so the result is the same up to that rounding.
    """

    def forward(self, x: Tensor) -> Tensor:
        """`[..., hidden_size]` -> the same shape and dtype."""
        if x.is_cuda and x.dtype == self.weight.dtype and x.dim() > 0 \
                and not self.zero_centered_gamma \
                and x.shape[-1] == self.hidden_size:
            return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)
        return super().forward(x)


class FusedActivation(Activation):
    """`Activation` whose gated SiLU (SwiGLU) runs as one fused kernel on CUDA (liger-kernel)."""

    def forward(self, x: Tensor, /) -> Tensor:
        if not torch.compiler.is_compiling() and self.gated and self.activation_func is F.silu \
                and x.is_cuda and liger_available() and x.shape[-1] % 2 == 0:
            return fused_swiglu(x)  # [..., f]
        return super().forward(x)


def _weighted_activation(x: Tensor, probs: Tensor, activation_func: Callable[[Tensor], Tensor],
                         gated: bool) -> Tensor:
    """`act(gate) * up * prob` (gated) or `act(x) * prob`: `[N, 2f]` or `[N, f]`, `[N]` -> `[N, f]`."""
    if gated:
        gate, up = torch.chunk(x, 2, dim=-1)
        out = activation_func(gate) * up
    else:
        out = activation_func(x)
    return out * probs.unsqueeze(-1).to(out.dtype)


@functools.cache
def _compiled_weighted_activation() -> Callable[..., Tensor]:
    compiled: object = torch.compile(_weighted_activation)  # pyright: ignore[reportUnknownMemberType]  # torch.compile's overloads carry Unknown
    return cast(Callable[..., Tensor], compiled)


class FusedExpertActivation(ExpertActivation):
    """`ExpertActivation` as one fused kernel on CUDA: Inductor compiles the activation, the
    gating product and the routing-weight product (and their backward) into single passes
    over the `[N, 2f]` rows. Elsewhere, or if compilation fails (warned once), the local one."""

    compile_failed = False  # set once torch.compile has failed in this process

    def forward(self, x: Tensor, probs: Tensor, /) -> Tensor:
        if x.is_cuda and not FusedExpertActivation.compile_failed:
            try:
                return _compiled_weighted_activation()(
                    x, probs, self.activation.activation_func, self.activation.gated)
            except Exception as error:  # no working compiler toolchain: keep training, unfused
                FusedExpertActivation.compile_failed = True
                warnings.warn(f"FusedExpertActivation: torch.compile failed ({error!r}); using "
                              "the unfused activation", stacklevel=2)
        return super().forward(x, probs)


class FusedSDPAttention(SDPAttention):
    """`SDPAttention` restricted, on CUDA in half precision, to the fused SDPA kernels.

    `kernels` lists the allowed kernels in order of preference (default flash, then cuDNN,
    then memory-efficient); PyTorch's dispatcher takes the first whose constraints the call
    meets (head size, mask, grouped heads), and never the unfused math kernel, whose
    `[b, np, sq, sk]` score matrix is what a fused kernel exists to avoid. Float32 inputs,
    CPU tensors, head sizes no fused kernel takes (over 256, or not a multiple of 8) and
    calls none of the allowed kernels accepts (PyTorch reports "No available kernel") run
    `SDPAttention` unchanged.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: AttentionTypeName = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        pg: ProcessGroups | None = None,
        window_size: int | None = None,
        *,
        kernels: Sequence[AttentionKernel] = DEFAULT_ATTENTION_KERNELS,
    ) -> None:
        super().__init__(config, layer_number, attn_mask_type, attention_type,
                         attention_dropout, softmax_scale, pg, window_size)
        self.kernels: tuple[AttentionKernel, ...] = _check_kernels(kernels)
        self._sdpa_backends = [_SDPA_BACKENDS[name] for name in self.kernels]
        self._unfusable: set[tuple[object, ...]] = set()

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        /,
        *,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
    ) -> Tensor:
        """`[sq, b, np, hn]`, `[sk, b, ng, hn]`, `[sk, b, ng, hv]` -> `[sq, b, np * hv]`."""
        if torch.compiler.is_compiling():
            # In a compiled layer the attention kernel runs outside the graph (a graph break):
            # the same kernel choice and fallbacks as eager, whatever Dynamo supports.
            return _outside_graph(self._fused_forward, query, key, value, attention_mask,
                                  attn_mask_type, attention_bias)
        return self._fused_forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias)

    def _fused_forward(self, query: Tensor, key: Tensor, value: Tensor,
                       attention_mask: Tensor | None, attn_mask_type: AttnMaskType | None,
                       attention_bias: Tensor | None) -> Tensor:
        head_dims = (query.shape[-1], value.shape[-1]) if query.dim() == 4 == value.dim() else (0,)
        fusable = query.is_cuda and query.dtype in _HALF_DTYPES \
            and all(0 < d <= 256 and d % 8 == 0 for d in head_dims)
        # Calls no allowed kernel can take (e.g. grouped heads with only a kernel that lacks
        # them in this torch version) are remembered by kind and run unrestricted.
        kind = (query.dtype, head_dims, key.dim() == 4 and key.shape[2] != query.shape[2],
                attention_mask is not None or attention_bias is not None, attn_mask_type)
        if fusable and kind not in self._unfusable:
            try:
                with _restrict_sdpa(self._sdpa_backends):
                    return super().forward(query, key, value, attention_mask,
                                           attn_mask_type=attn_mask_type,
                                           attention_bias=attention_bias)
            except RuntimeError as error:
                if "No available kernel" not in str(error):
                    raise
                self._unfusable.add(kind)
        return super().forward(query, key, value, attention_mask,
                               attn_mask_type=attn_mask_type, attention_bias=attention_bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernels={list(self.kernels)}"


def _call_eagerly(function: Callable[..., Tensor], /, *args: object) -> Tensor:
    return function(*args)


# `torch.compiler.disable` returns its argument's type untyped; this is `_call_eagerly`.
_outside_graph = cast(Callable[..., Tensor], torch.compiler.disable(_call_eagerly))  # type: ignore[no-untyped-call]  # pyright: ignore[reportUnknownMemberType]  # torch leaves disable unannotated


def _restrict_sdpa(backends: list[SDPBackend]) -> AbstractContextManager[object]:
    # torch types the yielded value as a bare `dict`; nothing here uses it.
    if _SDPA_HAS_PRIORITY:
        return cast("AbstractContextManager[object]", sdpa_kernel(backends, set_priority=True))
    return cast("AbstractContextManager[object]", sdpa_kernel(backends))


def _check_kernels(kernels: Sequence[str]) -> tuple[AttentionKernel, ...]:
    if isinstance(kernels, str) or not kernels:
        raise ValueError(f"kernels={kernels!r}: expected a non-empty sequence of names from "
                         f"{sorted(_SDPA_BACKENDS)}, e.g. ('flash', 'cudnn', 'efficient')")
    unknown = [k for k in kernels if k not in _SDPA_BACKENDS]
    if unknown:
        raise ValueError(f"kernels={list(kernels)!r}: unknown attention kernel(s) {unknown}; "
                         f"choose from {sorted(_SDPA_BACKENDS)}")
    checked: list[AttentionKernel] = []
    for name in dict.fromkeys(kernels):
        if name == "flash":
            checked.append("flash")
        elif name == "cudnn":
            checked.append("cudnn")
        else:
            checked.append("efficient")
    return tuple(checked)


class FusedSpecProvider(LocalSpecProvider):
    """The general layer builders with fused GPU kernels (`BackendSpecProvider`, `name == "fused"`).

    `attention_kernels` orders the fused SDPA kernels core attention may use. The backend
    needs no GPU: on CPU (or without liger-kernel) each builder falls back to the local
    implementation. The linears are the local backend's (a cuBLAS matmul already), taking
    float8 matmuls with `config.fp8`. `kernel_report()` says which fused paths are live in this process.
    """

    name: str = "fused"

    def __init__(self, *, attention_kernels: Sequence[AttentionKernel] = DEFAULT_ATTENTION_KERNELS) -> None:
        self.attention_kernels = _check_kernels(attention_kernels)

    def column_parallel_linear(self) -> ColumnParallelLinearBuilder:
        """`Fp8ColumnParallelLinear`: the local linear, in float8 with `config.fp8` on a GPU."""
        return Fp8ColumnParallelLinear

    def row_parallel_linear(self) -> RowParallelLinearBuilder:
        """`Fp8RowParallelLinear`: the local linear, in float8 with `config.fp8` on a GPU."""
        return Fp8RowParallelLinear

    def layer_norm(self, *, rms_norm: bool = False, for_qk: bool = False) -> LayerNormBuilder:
        """`FusedRMSNorm` with `rms_norm`, else `FusedLayerNorm`; both also normalize per head."""
        del for_qk  # the fused kernels normalize any last dimension, heads included
        return FusedRMSNorm if rms_norm else FusedLayerNorm

    def core_attention(self) -> CoreAttentionBuilder:
        """`FusedSDPAttention` limited to this backend's `attention_kernels`."""
        if self.attention_kernels == DEFAULT_ATTENTION_KERNELS:
            return FusedSDPAttention
        return functools.partial(FusedSDPAttention, kernels=self.attention_kernels)

    def activation(self) -> ActivationBuilder:
        """`FusedActivation`: SwiGLU fused on CUDA, otherwise `config.activation_func`."""
        return FusedActivation

    def expert_activation(self) -> ExpertActivationBuilder:
        """`FusedExpertActivation`: the MoE experts' activation x routing weight in one pass."""
        return FusedExpertActivation

    def kernel_report(self) -> dict[str, bool]:
        """Which fused paths this process can take (each also needs CUDA tensors at run time)."""
        cuda = torch.cuda.is_available()
        liger = liger_available()
        return {
            "cuda": cuda,
            "triton_rope": triton_available(),
            "liger_rms_norm": liger,
            "liger_swiglu": liger,
            "liger_fused_linear_cross_entropy": liger,
            "fused_sdpa": cuda,
            "compiled_expert_activation": cuda and not FusedExpertActivation.compile_failed,
            "torchao_fp8": fp8_training_available(),
        }

    def __repr__(self) -> str:
        return f"FusedSpecProvider(attention_kernels={list(self.attention_kernels)})"


def fused_config(config: TransformerConfig) -> TransformerConfig:
    """A copy of `config` with the model-level fusions on: fused RoPE and fused linear + loss."""
    return dataclasses.replace(config, apply_rope_fusion=True, cross_entropy_loss_fusion=True)


