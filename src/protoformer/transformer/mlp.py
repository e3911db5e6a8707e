"""The MLP block and the Builder/Interface protocols of its slots.

`init_method_normal` and `scaled_init_method_normal` live in `protoformer.initialization` and
are re-exported here, where they were first defined.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from protoformer.config import TransformerConfig
from protoformer.initialization import init_method_normal, scaled_init_method_normal
from protoformer.parallel.groups import ProcessGroups
from protoformer.parallel.protocols import (
    ColumnParallelLinearBuilder,
    InitMethod,
    RowParallelLinearBuilder,
)
from protoformer.spec import Submodules, apply_module

__all__ = [
    "MLP",
    "Activation",
    "ActivationBuilder",
    "ActivationInterface",
    "LinearFc1Builder",
    "LinearFc2Builder",
    "MLPBuilder",
    "MLPInterface",
    "MLPSubmodules",
    "gelu_tanh",
    "init_method_normal",
    "scaled_init_method_normal",
]

LinearFc1Builder = ColumnParallelLinearBuilder
"""The MLP's first linear: the column-parallel builder (output split over ranks)."""

LinearFc2Builder = RowParallelLinearBuilder
"""The MLP's second linear: *the same* row-parallel builder as attention's `linear_proj`."""


class ActivationInterface(Protocol):
    """The MLP's nonlinearity. Gated: `[..., 2 * f]` (gate then up) -> `[..., f]`; else shape-preserving."""

    def forward(self, x: Tensor, /) -> Tensor: ...


def gelu_tanh(x: Tensor, /) -> Tensor:
    """GeLU with the tanh approximation (GPT-2's and T5 v1.1's `gelu_new`): pass it as
    `TransformerConfig(activation_func=gelu_tanh)`. A module-level function, so a config that
    uses it can be saved and loaded by name."""
    return torch.nn.functional.gelu(x, approximate="tanh")


class ActivationBuilder(Protocol):
    """Builds the MLP's activation from the config (`activation_func`, `gated_linear_unit`)."""

    def __call__(self, config: TransformerConfig, /, *, gated: bool) -> ActivationInterface: ...


class Activation(nn.Module):
    """`config.activation_func`, gated (GLU family) or plain.

    Gated: the last dimension holds the gate half then the up half; the output is
    `act(gate) * up` (SwiGLU with `F.silu`, GeGLU with `F.gelu`). Plain: `act(x)`.
    """

    def __init__(self, config: TransformerConfig, /, *, gated: bool) -> None:
        super().__init__()
        self.activation_func = config.activation_func
        self.gated = gated

    def forward(self, x: Tensor, /) -> Tensor:
        if not self.gated:
            return self.activation_func(x)
        if x.shape[-1] % 2 != 0:
            raise ValueError(f"a gated activation needs an even last dimension (gate then up), "
                             f"got shape {tuple(x.shape)}")
        gate, up = torch.chunk(x, 2, dim=-1)  # each [..., f]
        return self.activation_func(gate) * up

    def extra_repr(self) -> str:
        name = getattr(self.activation_func, "__name__", repr(self.activation_func))
        return f"{name}, gated={self.gated}"


@dataclass
class MLPSubmodules(Submodules):
    """The slots of `MLP`: two linears and the activation between them."""

    linear_fc1: LinearFc1Builder
    linear_fc2: LinearFc2Builder
    activation: ActivationBuilder


class MLPInterface(Protocol):
    """A built MLP: `[s, b, h]` -> (`[s, b, h]`, output bias or None for a fused add).

    `input_size` (Megatron-Core's name) is the width the MLP reads. Besides saying what the
    layer feeds it, it keeps the MLP and attention interfaces apart for every checker: their
    `forward`s accept the same call, so without it mypy (which sees a `functools.partial` as
    `(*Any, **Any) -> SelfAttention`) would let an attention layer fill the `mlp` slot.
    """

    input_size: int

    def forward(self, hidden_states: Tensor, /) -> tuple[Tensor, Tensor | None]: ...


class MLPBuilder(Protocol):
    """Builds the MLP of a transformer layer: `partial(MLP, submodules=MLPSubmodules(...))`."""

    def __call__(self, config: TransformerConfig, /, *, pg: ProcessGroups | None) -> MLPInterface: ...


def _rank_ordered_glu_init(base: InitMethod, ffn: int, tp_size: int) -> InitMethod:
    """Initialise a full gated `fc1` weight as `base` would, then reorder it for `tp_size` ranks.

    The single-process layout is `[gate | up]`; split over ranks each needs its own gate rows
    followed by its own up rows, so the full weight is `[g_0 u_0 | g_1 u_1 | ...]`. Reordering
    the freshly initialised full weight makes a tensor-parallel model built after a given seed
    equal to the single-process one. A builder that passes only its shard to the init method
    (not the full `[2 * ffn, h]` weight) is left with `base`'s (i.i.d.) values.
    """

    def init(weight: Tensor) -> object:
        base(weight)
        if weight.dim() == 2 and weight.shape[0] == 2 * ffn:
            with torch.no_grad():
                gate, up = weight.chunk(2, dim=0)  # [ffn, h] each
                per_rank = torch.stack(
                    (gate.reshape(tp_size, ffn // tp_size, -1),
                     up.reshape(tp_size, ffn // tp_size, -1)), dim=1)  # [tp, 2, ffn / tp, h]
                weight.copy_(per_rank.reshape(2 * ffn, -1))  # [2 * ffn, h]
        return weight

    return init


class MLP(nn.Module):
    """Position-wise feed-forward block: `fc2(act(fc1(x)))`, split over tensor-parallel ranks.

    `linear_fc1` is column-parallel (each rank holds `ffn_hidden_size / tp` features, twice
    that when gated: the rank's gate half then its up half, so the full gated weight across
    ranks is ordered `[g_0 u_0 | g_1 u_1 | ...]`, Megatron-Core's layout) and `linear_fc2`
    row-parallel, so the only communication is `linear_fc2`'s reduction. Returns `(output, bias)` with the
    second linear's bias left unadded so the layer can fuse it into its residual add.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: MLPSubmodules,
        *,
        pg: ProcessGroups | None = None,
        input_size: int | None = None,
        ffn_hidden_size: int | None = None,
        is_expert: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(submodules, MLPSubmodules):  # pyright: ignore[reportUnnecessaryIsInstance]  # user input
            raise TypeError(f"MLP expects submodules=MLPSubmodules(...), got "
                            f"{type(submodules).__qualname__}")
        self.config = config
        pg = pg if pg is not None else ProcessGroups()
        tp_size = pg.tp_size
        ffn = ffn_hidden_size if ffn_hidden_size is not None else config.ffn_size
        if ffn % tp_size != 0:
            raise ValueError(f"ffn_hidden_size={ffn} must be divisible by the tensor-parallel "
                             f"size {tp_size}; choose an ffn_hidden_size that is a multiple of it")
        self.input_size: int = input_size if input_size is not None else config.hidden_size
        gated = config.gated_linear_unit
        fc1_size = 2 * ffn if gated else ffn
        fc1_init = init_method_normal(config.init_method_std)
        if gated and tp_size > 1:
            fc1_init = _rank_ordered_glu_init(fc1_init, ffn, tp_size)

        self.linear_fc1 = submodules.linear_fc1(
            self.input_size,
            fc1_size,
            config=config,
            init_method=fc1_init,
            bias=config.add_bias_linear,
            gather_output=False,
            skip_bias_add=True,
            is_expert=is_expert,
            tp_comm_buffer_name="fc1",
            tp_group=pg.tp,
        )
        self.activation_func = submodules.activation(config, gated=gated)
        self.linear_fc2 = submodules.linear_fc2(
            ffn,
            config.hidden_size,
            config=config,
            init_method=scaled_init_method_normal(config.init_method_std, config.num_layers),
            bias=config.add_bias_linear,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=is_expert,
            tp_comm_buffer_name="fc2",
            tp_group=pg.tp,
        )

    def forward(self, hidden_states: Tensor, /) -> tuple[Tensor, Tensor | None]:
        intermediate, fc1_bias = apply_module(self.linear_fc1)(hidden_states)  # [s, b, f/tp] (x2 gated)
        if fc1_bias is not None:
            intermediate = intermediate + fc1_bias
        intermediate = apply_module(self.activation_func)(intermediate)  # [s, b, f/tp]
        return apply_module(self.linear_fc2)(intermediate)  # ([s, b, h], bias or None)

    def backward_dw(self) -> None:
        """Compute both linears' deferred weight gradients (`config.delay_wgrad_compute`)."""
        self.linear_fc1.backward_dw()
        self.linear_fc2.backward_dw()
