"""Typing test: the three general linear kinds in slots typed by their Builder protocols.

Only type-checked (see README.md), never run. Lines without an ignore comment must be
accepted by pyright and mypy; each line with an ignore comment must be rejected by both.
The kinds differ in the keyword that says how the weight is split (`input_is_parallel` for
row-parallel, `gather_output` for column-parallel, neither for the replicated `Linear`), so
one kind can never pass for another.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from protoformer.config import TransformerConfig
from protoformer.parallel import ColumnParallelLinear, Linear, RowParallelLinear
from protoformer.parallel.groups import ProcessGroup
from protoformer.parallel.protocols import (
    ColumnParallelLinearBuilder,
    InitMethod,
    LinearBuilder,
    RowParallelLinearBuilder,
)
from protoformer.spec import Submodules, apply_module


@dataclass
class LinearSlots(Submodules):
    row: RowParallelLinearBuilder
    column: ColumnParallelLinearBuilder
    replicated: LinearBuilder
    optional_row: RowParallelLinearBuilder | None = None


# -- user builders -----------------------------------------------------------------------------


class Fp8RowParallelLinear(RowParallelLinear):
    """A user subclass with an extra required keyword-only option."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        fp8: bool,
        config: TransformerConfig,
        init_method: InitMethod,
        bias: bool,
        input_is_parallel: bool,
        skip_bias_add: bool,
        is_expert: bool = False,
        tp_comm_buffer_name: str | None = None,
        tp_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__(input_size, output_size, config=config, init_method=init_method,
                         bias=bias, input_is_parallel=input_is_parallel,
                         skip_bias_add=skip_bias_add, is_expert=is_expert,
                         tp_comm_buffer_name=tp_comm_buffer_name, tp_group=tp_group)
        self.fp8 = fp8


def make_row_linear(
    input_size: int,
    output_size: int,
    /,
    *,
    config: TransformerConfig,
    init_method: InitMethod,
    bias: bool,
    input_is_parallel: bool,
    skip_bias_add: bool,
    is_expert: bool,
    tp_comm_buffer_name: str | None,
    tp_group: ProcessGroup | None,
) -> RowParallelLinear:
    """A function builder with exactly the protocol's signature."""
    return RowParallelLinear(input_size, output_size, config=config, init_method=init_method,
                             bias=bias, input_is_parallel=input_is_parallel,
                             skip_bias_add=skip_bias_add, is_expert=is_expert,
                             tp_comm_buffer_name=tp_comm_buffer_name, tp_group=tp_group)


def make_row_linear_without_tp_group(
    input_size: int,
    output_size: int,
    /,
    *,
    config: TransformerConfig,
    init_method: InitMethod,
    bias: bool,
    input_is_parallel: bool,
    skip_bias_add: bool,
    is_expert: bool,
    tp_comm_buffer_name: str | None,
) -> RowParallelLinear:
    """Lacks the `tp_group` keyword the row-parallel protocol passes."""
    return RowParallelLinear(input_size, output_size, config=config, init_method=init_method,
                             bias=bias, input_is_parallel=input_is_parallel,
                             skip_bias_add=skip_bias_add, is_expert=is_expert,
                             tp_comm_buffer_name=tp_comm_buffer_name)


class _RowSignature(nn.Module):
    """The row-parallel constructor signature, for the broken layers below."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: TransformerConfig,
        init_method: InitMethod,
        bias: bool,
        input_is_parallel: bool,
        skip_bias_add: bool,
        is_expert: bool = False,
        tp_comm_buffer_name: str | None = None,
        tp_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(input_size, output_size, bias=bias)


class BareTensorRowLinear(_RowSignature):
    """Its forward returns a bare Tensor instead of (output, bias)."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        return apply_module(self.proj)(hidden_states)

    def backward_dw(self) -> None:
        return None


class NoBackwardDwRowLinear(_RowSignature):
    """Lacks `backward_dw`."""

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor | None]:
        return apply_module(self.proj)(hidden_states), None


class TwoInputRowLinear(_RowSignature):
    """Its forward needs a second input the parent never passes."""

    def forward(self, hidden_states: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:
        return apply_module(self.proj)(hidden_states * mask), None

    def backward_dw(self) -> None:
        return None


# -- correct wirings: both checkers accept -----------------------------------------------------

config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2)
layer = RowParallelLinear(8, 8, config=config, init_method=torch.nn.init.zeros_, bias=True,
                          input_is_parallel=False, skip_bias_add=False)


LinearSlots(row=RowParallelLinear, column=ColumnParallelLinear, replicated=Linear)
LinearSlots(row=make_row_linear, column=ColumnParallelLinear, replicated=Linear, optional_row=RowParallelLinear)
LinearSlots(row=partial(Fp8RowParallelLinear, fp8=True), column=ColumnParallelLinear, replicated=Linear)
LinearSlots(row=RowParallelLinear, column=ColumnParallelLinear, replicated=Linear, optional_row=None)
row_slot: RowParallelLinearBuilder = RowParallelLinear
column_slot: ColumnParallelLinearBuilder = ColumnParallelLinear
replicated_slot: LinearBuilder = Linear

# -- miswirings: both checkers reject ----------------------------------------------------------

# One kind in another kind's slot.
LinearSlots(row=ColumnParallelLinear, column=ColumnParallelLinear, replicated=Linear)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
LinearSlots(row=RowParallelLinear, column=RowParallelLinear, replicated=Linear)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
LinearSlots(row=RowParallelLinear, column=ColumnParallelLinear, replicated=RowParallelLinear)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
LinearSlots(row=RowParallelLinear, column=ColumnParallelLinear, replicated=ColumnParallelLinear)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
LinearSlots(row=Linear, column=ColumnParallelLinear, replicated=Linear)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
LinearSlots(row=RowParallelLinear, column=Linear, replicated=Linear)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
LinearSlots(row=RowParallelLinear, column=ColumnParallelLinear, replicated=Linear, optional_row=ColumnParallelLinear)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
bad_row_slot: RowParallelLinearBuilder = ColumnParallelLinear  # type: ignore[assignment]  # pyright: ignore[reportAssignmentType]
bad_column_slot: ColumnParallelLinearBuilder = RowParallelLinear  # type: ignore[assignment]  # pyright: ignore[reportAssignmentType]

# User builders that do not fit the row-parallel protocol.
LinearSlots(row=BareTensorRowLinear, column=ColumnParallelLinear, replicated=Linear)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
LinearSlots(row=NoBackwardDwRowLinear, column=ColumnParallelLinear, replicated=Linear)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
LinearSlots(row=TwoInputRowLinear, column=ColumnParallelLinear, replicated=Linear)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
LinearSlots(row=Fp8RowParallelLinear, column=ColumnParallelLinear, replicated=Linear)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
LinearSlots(row=make_row_linear_without_tp_group, column=ColumnParallelLinear, replicated=Linear)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
LinearSlots(row=partial(BareTensorRowLinear, is_expert=False), column=ColumnParallelLinear, replicated=Linear)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]

# Not builders at all.
LinearSlots(row=None, column=ColumnParallelLinear, replicated=Linear)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
LinearSlots(row="RowParallelLinear", column=ColumnParallelLinear, replicated=Linear)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]

# A partial with the wrong remaining keywords. pyright compares the partial's remaining
# signature (here: no `input_is_parallel`) with the protocol; mypy types partial.__call__ as
# (*args: Any, **kwargs: Any) and checks only what the partial builds.
LinearSlots(row=partial(ColumnParallelLinear, gather_output=False), column=ColumnParallelLinear, replicated=Linear)  # pyright: ignore[reportArgumentType]  # one-checker: mypy does not check a partial's arguments

# Known static holes, caught only at runtime by check_builder (tests/spec): a partial that
# leaves an extra keyword required (both checkers accept it), and a module *instance*
# (nn.Module.__call__ is typed Callable[..., Any], so it fits any Builder protocol).
LinearSlots(row=partial(Fp8RowParallelLinear, bias=True), column=ColumnParallelLinear, replicated=Linear)
LinearSlots(row=layer, column=ColumnParallelLinear, replicated=Linear)

# -- the parent side: calling a slot and applying what it built --------------------------------


def build_and_apply(slots: LinearSlots, config: TransformerConfig, hidden_states: Tensor) -> Tensor:
    proj = slots.row(
        8, 8, config=config, init_method=torch.nn.init.zeros_, bias=True, input_is_parallel=True,
        skip_bias_add=True, is_expert=False, tp_comm_buffer_name=None, tp_group=None,
    )
    output, bias = apply_module(proj)(hidden_states)
    if bias is not None:
        output = output + bias
    return output


def build_without_required_keyword(slots: LinearSlots, config: TransformerConfig) -> None:
    slots.row(8, 8, config=config)  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]


def build_with_column_keyword(slots: LinearSlots, config: TransformerConfig) -> None:
    slots.row(8, 8, config=config, init_method=torch.nn.init.zeros_, bias=True, gather_output=True, skip_bias_add=True, is_expert=False, tp_comm_buffer_name=None, tp_group=None)  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]


t = torch.ones(3, 2, 8)  # [s, b, h]
out, bias = apply_module(layer)(t)
out_checked: Tensor = out
bias_checked: Tensor | None = bias
wrong: int = apply_module(layer)(t)  # type: ignore[assignment]  # pyright: ignore[reportAssignmentType]
wrong_bias: Tensor = apply_module(layer)(t)[1]  # type: ignore[assignment]  # pyright: ignore[reportAssignmentType]
apply_module(layer)(t, t)  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]
