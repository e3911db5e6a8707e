"""One pre-norm transformer layer: attention and MLP, each inside a residual branch."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import checkpoint as torch_checkpoint

from protoformer.config import TransformerConfig
from protoformer.parallel.groups import ProcessGroups
from protoformer.parallel.random import checkpoint_rng_context_fn, tensor_parallel_rng_fork
from protoformer.spec import Submodules, apply_module
from protoformer.transformer.compile import CompileOptions, compiled_function
from protoformer.transformer.inference import InferenceContext
from protoformer.transformer.interfaces import CrossAttentionBuilder, SelfAttentionBuilder
from protoformer.transformer.mlp import MLPBuilder
from protoformer.transformer.norm import LayerNormBuilder, LayerNormInterface

# torch leaves checkpoint's `function` parameter unannotated; this is the type we call it with.
_checkpoint = cast("Callable[..., object]", torch_checkpoint.checkpoint)  # pyright: ignore[reportUnknownMemberType]

__all__ = [
    "TransformerLayer",
    "TransformerLayerBuilder",
    "TransformerLayerInterface",
    "TransformerLayerSubmodules",
    "bias_dropout_add",
]


@dataclass(kw_only=True)
class TransformerLayerSubmodules(Submodules):
    """The slots of `TransformerLayer`, in the order the forward pass uses them (keywords only).

    `cross_attention` (with its optional `pre_cross_attn_layernorm`; None means no norm) is
    for decoder layers that attend to an encoder's output.

    `post_self_attn_layernorm` / `post_mlp_layernorm` normalize a branch's output before it
    is added to the residual stream (None: no norm): Gemma 2/3's "sandwich" norms, and with
    `IdentityOp` in the pre-norm slots OLMo 2's post-norm layers.

    `parallel_residual=True` (GPT-NeoX, GPT-J) computes attention and MLP from the same
    input, `x + attn(ln1(x)) + mlp(ln2(x))`, instead of one after the other; it takes no
    cross-attention.
    """

    input_layernorm: LayerNormBuilder
    self_attention: SelfAttentionBuilder
    post_self_attn_layernorm: LayerNormBuilder | None = None
    pre_cross_attn_layernorm: LayerNormBuilder | None = None
    cross_attention: CrossAttentionBuilder | None = None
    pre_mlp_layernorm: LayerNormBuilder
    mlp: MLPBuilder
    post_mlp_layernorm: LayerNormBuilder | None = None
    parallel_residual: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.parallel_residual, bool):  # pyright: ignore[reportUnnecessaryIsInstance]  # user input
            raise TypeError(f"TransformerLayerSubmodules.parallel_residual="
                            f"{self.parallel_residual!r}: must be True or False")
        if self.parallel_residual and self.cross_attention is not None:
            raise ValueError(
                "TransformerLayerSubmodules: parallel_residual=True runs attention and MLP side "
                "by side from the layer input, which leaves no place for cross_attention; use "
                "parallel_residual=False for a layer with cross-attention")
        if self.pre_cross_attn_layernorm is not None and self.cross_attention is None:
            raise ValueError(
                "TransformerLayerSubmodules: pre_cross_attn_layernorm is set but cross_attention "
                "is None; the norm would have nothing to feed. Set cross_attention or drop the norm")


def bias_dropout_add(
    x: Tensor, bias: Tensor | None, residual: Tensor, *, prob: float, training: bool
) -> Tensor:
    """`residual + dropout(x + bias)`: the end of every residual branch (Megatron-Core's BDA)."""
    if bias is not None:
        x = x + bias
    return residual + F.dropout(x, p=prob, training=training)


class TransformerLayerInterface(Protocol):
    """A built transformer layer: `[s, b, h]` -> `[s, b, h]`."""

    def forward(
        self,
        hidden_states: Tensor,
        /,
        attention_mask: Tensor | None = None,
        *,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        rotary_pos_emb: Tensor | None = None,
        inference_context: InferenceContext | None = None,
    ) -> Tensor: ...


class TransformerLayerBuilder(Protocol):
    """Builds layer `layer_number` (1-based) of a stack."""

    def __call__(
        self,
        config: TransformerConfig,
        submodules: TransformerLayerSubmodules,
        /,
        layer_number: int = 1,
        *,
        pg: ProcessGroups | None = None,
    ) -> TransformerLayerInterface: ...


class TransformerLayer(nn.Module):
    """Pre-norm layer: `x + attn(norm(x))` [+ `cross_attn(norm(.), context)`], then `+ mlp(norm(.))`;
    with `submodules.parallel_residual`, `x + attn(norm1(x)) + mlp(norm2(x))`.

    With post-norms a branch's output is normalized before the residual add:
    `x + post_norm(attn(norm(x)))` (the branch's output bias is added before that norm).

    Each residual branch ends in `bias_dropout_add` with `config.hidden_dropout` (active only
    in training). With `config.recompute_granularity == "full"` the whole layer is
    recomputed in the backward pass instead of keeping its activations (training only).

    With `compile_options` set (`protoformer.models.compile_layers`), the layer's computation
    runs through `torch.compile` (one compiled graph shared by the layers of a stack); calls
    with an `inference_context` (KV-cache decoding) stay eager.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: TransformerLayerSubmodules,
        layer_number: int = 1,
        *,
        pg: ProcessGroups | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(submodules, TransformerLayerSubmodules):  # pyright: ignore[reportUnnecessaryIsInstance]  # user input
            raise TypeError(f"TransformerLayer expects submodules=TransformerLayerSubmodules(...), "
                            f"got {type(submodules).__qualname__}")
        if isinstance(layer_number, bool) or not isinstance(layer_number, int) or layer_number < 1:  # pyright: ignore[reportUnnecessaryIsInstance]  # user input
            raise ValueError(f"layer_number={layer_number!r} must be an int >= 1 (layers are "
                             "numbered from 1, as in Megatron-Core)")
        self.config = config
        self.pg = pg if pg is not None else ProcessGroups()
        self.layer_number = layer_number
        self.hidden_dropout = config.hidden_dropout
        hidden, eps = config.hidden_size, config.layernorm_epsilon

        self.input_layernorm = submodules.input_layernorm(hidden, config=config, eps=eps)
        self.self_attention = submodules.self_attention(config, layer_number=layer_number, pg=pg)
        self.post_self_attn_layernorm = _optional_norm(submodules.post_self_attn_layernorm,
                                                       hidden, config, eps)
        self.pre_cross_attn_layernorm: LayerNormInterface | None = None
        if submodules.pre_cross_attn_layernorm is not None:
            self.pre_cross_attn_layernorm = submodules.pre_cross_attn_layernorm(
                hidden, config=config, eps=eps)
        self.cross_attention = None
        if submodules.cross_attention is not None:
            self.cross_attention = submodules.cross_attention(
                config, layer_number=layer_number, pg=pg)
        self.pre_mlp_layernorm = submodules.pre_mlp_layernorm(hidden, config=config, eps=eps)
        self.mlp = submodules.mlp(config, pg=pg)
        self.post_mlp_layernorm = _optional_norm(submodules.post_mlp_layernorm, hidden, config,
                                                 eps)
        self.parallel_residual = submodules.parallel_residual
        self.compile_options: CompileOptions | None = None

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        *,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        rotary_pos_emb: Tensor | None = None,
        inference_context: InferenceContext | None = None,
    ) -> Tensor:
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.config.hidden_size:
            raise ValueError(f"TransformerLayer expects hidden_states [s, b, "
                             f"{self.config.hidden_size}], got shape {tuple(hidden_states.shape)}")
        if self.cross_attention is None and context is not None:
            raise ValueError("context was given but this layer has no cross_attention; build it "
                             "with TransformerLayerSubmodules(cross_attention=...)")
        forward = self._forward
        if self.compile_options is not None and inference_context is None:
            # The unbound function compiled once: every layer of the stack reuses its graph.
            forward = functools.partial(
                compiled_function(type(self)._forward, self.compile_options), self)
        if self.config.recompute_granularity == "full" and self.training \
                and torch.is_grad_enabled():
            output = _checkpoint(
                forward, hidden_states, attention_mask, context, context_mask,
                rotary_pos_emb, inference_context, use_reentrant=False,
                # Replays the tensor-parallel dropout streams too, not only the default RNG.
                context_fn=checkpoint_rng_context_fn())
            assert isinstance(output, Tensor)
            return output
        return forward(hidden_states, attention_mask, context, context_mask, rotary_pos_emb,
                       inference_context)

    def _forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None,
        context: Tensor | None,
        context_mask: Tensor | None,
        rotary_pos_emb: Tensor | None,
        inference_context: InferenceContext | None,
    ) -> Tensor:
        normed = apply_module(self.input_layernorm)(hidden_states)  # [s, b, h]
        out, bias = apply_module(self.self_attention)(
            normed, attention_mask, rotary_pos_emb=rotary_pos_emb,
            inference_context=inference_context)
        out, bias = _post_norm(self.post_self_attn_layernorm, out, bias)
        if self.parallel_residual:
            # Both branches read the layer input: x + attn(ln1(x)) + mlp(ln2(x)).
            mlp_out, mlp_bias = apply_module(self.mlp)(
                apply_module(self.pre_mlp_layernorm)(hidden_states))  # [s, b, h]
            mlp_out, mlp_bias = _post_norm(self.post_mlp_layernorm, mlp_out, mlp_bias)
            hidden_states = self._bias_dropout_add(out, bias, hidden_states)
            return self._bias_dropout_add(mlp_out, mlp_bias, hidden_states)  # [s, b, h]
        hidden_states = self._bias_dropout_add(out, bias, hidden_states)

        if self.cross_attention is not None:
            normed = hidden_states
            if self.pre_cross_attn_layernorm is not None:
                normed = apply_module(self.pre_cross_attn_layernorm)(hidden_states)
            # With an inference_context, cross-attention projects `context` once and keeps
            # its keys/values (under -layer_number, apart from self-attention's cache).
            out, bias = apply_module(self.cross_attention)(
                normed, context_mask, key_value_states=context,
                inference_context=inference_context)
            hidden_states = self._bias_dropout_add(out, bias, hidden_states)

        normed = apply_module(self.pre_mlp_layernorm)(hidden_states)
        out, bias = apply_module(self.mlp)(normed)
        out, bias = _post_norm(self.post_mlp_layernorm, out, bias)
        return self._bias_dropout_add(out, bias, hidden_states)  # [s, b, h]

    def _bias_dropout_add(self, x: Tensor, bias: Tensor | None, residual: Tensor) -> Tensor:
        p, training = self.hidden_dropout, self.training
        if training and p > 0.0 and self.config.sequence_parallel:
            # Each rank holds its own slice of the sequence: it draws its own mask. Without
            # sequence parallelism the activations are replicated and so must the mask be.
            with tensor_parallel_rng_fork(self.pg.tp):
                return bias_dropout_add(x, bias, residual, prob=p, training=training)
        return bias_dropout_add(x, bias, residual, prob=p, training=training)


def _optional_norm(builder: LayerNormBuilder | None, hidden: int, config: TransformerConfig,
                   eps: float) -> LayerNormInterface | None:
    return builder(hidden, config=config, eps=eps) if builder is not None else None


def _post_norm(norm: LayerNormInterface | None, out: Tensor,
               bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """A branch's output `[s, b, h]` through its post-norm (its bias added first), if any."""
    if norm is None:
        return out, bias
    return apply_module(norm)(out if bias is None else out + bias), None
