"""Builder and Interface protocols of the general linear layer kinds.

One Builder protocol per *general layer kind*; every parent calls a kind with the same
keyword set, so a backend says "this is *the* row-parallel linear" once and the type checker
verifies it in every slot that uses it (`linear_proj`, `linear_fc2`, ...).

The three kinds differ in exactly the keyword that says how the weight is split, and each
implementation *requires* that keyword, so one kind can never pass for another:
column-parallel takes `gather_output`, row-parallel takes `input_is_parallel`, and the
replicated `Linear` takes neither.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from torch import Tensor

from protoformer.config import TransformerConfig
from protoformer.parallel.groups import ProcessGroup

__all__ = [
    "ColumnParallelLinearBuilder",
    "ColumnParallelLinearInterface",
    "InitMethod",
    "LinearBuilder",
    "LinearLayerInterface",
    "RowParallelLinearBuilder",
    "RowParallelLinearInterface",
]

InitMethod = Callable[[Tensor], object]
"""Initialises a weight tensor in place (e.g. `partial(torch.nn.init.normal_, std=0.02)`)."""


class ColumnParallelLinearInterface(Protocol):
    """A linear layer whose output features are split across tensor-parallel ranks."""

    def forward(self, input_: Tensor, /) -> tuple[Tensor, Tensor | None]:
        """`[s, b, input_size]` -> (`[s, b, output_size / tp]` or gathered, bias or None)."""
        ...

    def backward_dw(self) -> None:
        """Compute the deferred weight gradient (with `config.delay_wgrad_compute`)."""
        ...


class ColumnParallelLinearBuilder(Protocol):
    """Builds a linear layer whose output is split across tensor-parallel ranks."""

    def __call__(
        self,
        input_size: int,
        output_size: int,
        /,
        *,
        config: TransformerConfig,
        init_method: InitMethod,
        bias: bool,
        gather_output: bool,
        skip_bias_add: bool,
        is_expert: bool,
        tp_comm_buffer_name: str | None,
        tp_group: ProcessGroup | None,
    ) -> ColumnParallelLinearInterface: ...


class RowParallelLinearInterface(Protocol):
    """A linear layer whose input features are split across tensor-parallel ranks."""

    def forward(self, hidden_states: Tensor, /) -> tuple[Tensor, Tensor | None]:
        """`[s, b, input_size / tp]` -> (`[s, b, output_size]` reduced over ranks, bias or None)."""
        ...

    def backward_dw(self) -> None:
        """Compute the deferred weight gradient (with `config.delay_wgrad_compute`)."""
        ...


class RowParallelLinearBuilder(Protocol):
    """Builds a linear layer whose input is split across tensor-parallel ranks."""

    def __call__(
        self,
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
    ) -> RowParallelLinearInterface: ...


class LinearLayerInterface(Protocol):
    """A linear layer replicated on every tensor-parallel rank (the same `(output, bias)` shape)."""

    def forward(self, input_: Tensor, /) -> tuple[Tensor, Tensor | None]: ...

    def backward_dw(self) -> None: ...


class LinearBuilder(Protocol):
    """Builds a linear layer whose weight is replicated, not split, across tensor-parallel ranks."""

    def __call__(
        self,
        input_size: int,
        output_size: int,
        /,
        *,
        config: TransformerConfig,
        init_method: InitMethod,
        bias: bool,
        skip_bias_add: bool,
        is_expert: bool,
        tp_comm_buffer_name: str | None,
    ) -> LinearLayerInterface: ...
