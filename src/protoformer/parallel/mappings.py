"""Autograd-aware collectives that move activations in and out of tensor-parallel regions.

Named as in Megatron-Core. Each function pairs a forward collective with the backward one that
makes the gradients right when the loss is *replicated* across the tensor-parallel ranks (every
rank computes the same loss, so a gradient is counted once, not once per rank):

| function | forward | backward |
| --- | --- | --- |
| `copy_to_tensor_model_parallel_region` | identity | all-reduce |
| `reduce_from_tensor_model_parallel_region` | all-reduce | identity |
| `scatter_to_tensor_model_parallel_region` | keep this rank's slice of the last dim | all-gather last dim |
| `gather_from_tensor_model_parallel_region` | all-gather last dim | keep this rank's slice |
| `scatter_to_sequence_parallel_region` | keep this rank's slice of dim 0 | all-gather dim 0 |
| `gather_from_sequence_parallel_region` | all-gather dim 0 | reduce-scatter dim 0 (or slice) |
| `reduce_scatter_to_sequence_parallel_region` | reduce-scatter dim 0 | all-gather dim 0 |

`torch.distributed.nn.functional` is not used: its `all_reduce` all-reduces in backward too
(right for a loss summed over ranks, twice-counted for a replicated one), it has no
identity-forward/all-reduce-backward pair, and torch 2.13 deprecates it. Every function is
the identity, with no `torch.distributed` call, when `group` is None or has one rank.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import FunctionCtx

from protoformer.parallel.groups import ProcessGroup, group_rank, group_size

__all__ = [
    "all_reduce_in_place",
    "apply_autograd_function",
    "copy_to_tensor_model_parallel_region",
    "gather_from_sequence_parallel_region",
    "gather_from_tensor_model_parallel_region",
    "reduce_from_tensor_model_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "scatter_to_sequence_parallel_region",
    "scatter_to_tensor_model_parallel_region",
]


def _dist_function(*names: str) -> Callable[..., object]:
    """The first of `names` that this torch's `torch.distributed` has (newest name first).

    torch 2.13 renamed the single-tensor collectives (`all_gather_into_tensor` ->
    `all_gather_single`, `reduce_scatter_tensor` -> `reduce_scatter_single`) and deprecates the
    old names; older releases have only those. torch also leaves their parameters unannotated.
    """
    for name in names:
        function: Callable[..., object] | None = getattr(dist, name, None)
        if function is not None:
            return function
    raise ImportError(f"torch.distributed has none of {names}; protoformer needs torch >= 2.4")


_all_reduce = _dist_function("all_reduce")
_all_gather_single = _dist_function("all_gather_single", "all_gather_into_tensor")
_reduce_scatter_single = _dist_function("reduce_scatter_single", "reduce_scatter_tensor")


def apply_autograd_function(function: type[Function], *args: object) -> Tensor:
    """`function.apply(*args)`, typed: the custom autograd functions here return one tensor."""
    output: object = function.apply(*args)  # type: ignore[no-untyped-call]  # torch leaves Function.apply unannotated
    assert isinstance(output, Tensor), f"{function.__qualname__} did not return one tensor"
    return output


def all_reduce_in_place(tensor: Tensor, group: ProcessGroup | None, *, op: str = "sum") -> Tensor:
    """All-reduce `tensor` in place over `group` (`op` is "sum" or "max"); no autograd.

    Returns `tensor`. A no-op when `group` is None or has one rank.
    """
    if group is None or group_size(group) == 1:
        return tensor
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}.get(op)
    if reduce_op is None:
        raise ValueError(f"all_reduce_in_place: op={op!r} is not supported; use 'sum' or 'max'")
    _all_reduce(tensor, op=reduce_op, group=group)
    return tensor


# -- the collectives, without autograd -------------------------------------------------------


def _reduce(input_: Tensor, group: ProcessGroup) -> Tensor:
    """Sum over ranks into a new tensor (the input is left untouched)."""
    output = input_.clone(memory_format=torch.contiguous_format)
    _all_reduce(output, op=dist.ReduceOp.SUM, group=group)
    return output


def _gather_first_dim(input_: Tensor, group: ProcessGroup) -> Tensor:
    """`[n, ...]` on each rank -> `[tp * n, ...]`, rank order."""
    input_ = input_.contiguous()
    output = torch.empty((group_size(group) * input_.shape[0], *input_.shape[1:]),
                         dtype=input_.dtype, device=input_.device)  # [tp * n, ...]
    _all_gather_single(output, input_, group=group)
    return output


def _gather_last_dim(input_: Tensor, group: ProcessGroup) -> Tensor:
    """`[..., n]` on each rank -> `[..., tp * n]`, rank order."""
    gathered = _gather_first_dim(input_, group)  # [tp * d0, ..., n]
    return torch.cat(gathered.chunk(group_size(group), dim=0), dim=-1)  # [d0, ..., tp * n]


def _reduce_scatter_first_dim(input_: Tensor, group: ProcessGroup) -> Tensor:
    """`[tp * n, ...]` on each rank -> this rank's `[n, ...]` slice of the sum over ranks."""
    size = group_size(group)
    _require_divisible(input_, 0, size, "reduce-scatter")
    input_ = input_.contiguous()
    if group in _NO_NATIVE_REDUCE_SCATTER:
        return _reduce(input_, group).chunk(size, dim=0)[group_rank(group)].contiguous()
    output = torch.empty((input_.shape[0] // size, *input_.shape[1:]),
                         dtype=input_.dtype, device=input_.device)  # [n, ...]
    try:
        _reduce_scatter_single(output, input_, op=dist.ReduceOp.SUM, group=group)
    except RuntimeError:
        # Some gloo builds lack the single-tensor reduce-scatter: all-reduce, keep our slice.
        if dist.get_backend(group) != "gloo":
            raise
        _NO_NATIVE_REDUCE_SCATTER.add(group)
        return _reduce(input_, group).chunk(size, dim=0)[group_rank(group)].contiguous()
    return output


_NO_NATIVE_REDUCE_SCATTER: set[ProcessGroup] = set()
"""Groups whose backend raised on the single-tensor reduce-scatter (then emulated)."""


def _split_first_dim(input_: Tensor, group: ProcessGroup) -> Tensor:
    size = group_size(group)
    _require_divisible(input_, 0, size, "split")
    return input_.chunk(size, dim=0)[group_rank(group)].contiguous()  # [n / tp, ...]


def _split_last_dim(input_: Tensor, group: ProcessGroup) -> Tensor:
    size = group_size(group)
    _require_divisible(input_, -1, size, "split")
    return input_.chunk(size, dim=-1)[group_rank(group)].contiguous()  # [..., n / tp]


def _require_divisible(input_: Tensor, dim: int, size: int, what: str) -> None:
    if input_.dim() == 0 or input_.shape[dim] % size != 0:
        raise ValueError(
            f"cannot {what} a tensor of shape {tuple(input_.shape)} over {size} tensor-parallel "
            f"ranks along dim {dim}: that dim must be a multiple of {size}. With sequence "
            "parallelism the sequence length must be a multiple of the tensor-parallel size; "
            "pad the batch to such a length")


# -- autograd functions ----------------------------------------------------------------------


class _GroupContext(FunctionCtx):
    """What the functions below keep for backward (a static view of torch's context object)."""

    group: ProcessGroup
    tensor_parallel_output_grad: bool


class _CopyToTensorParallelRegion(Function):
    @staticmethod
    def forward(ctx: _GroupContext, input_: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        return input_.view_as(input_)

    @staticmethod
    def backward(ctx: _GroupContext, *grad_outputs: Tensor) -> tuple[Tensor, None]:
        (grad_output,) = grad_outputs
        return _reduce(grad_output, ctx.group), None


class _ReduceFromTensorParallelRegion(Function):
    @staticmethod
    def forward(ctx: _GroupContext, input_: Tensor, group: ProcessGroup) -> Tensor:
        return _reduce(input_, group)

    @staticmethod
    def backward(ctx: _GroupContext, *grad_outputs: Tensor) -> tuple[Tensor, None]:
        (grad_output,) = grad_outputs
        return grad_output, None


class _ScatterToTensorParallelRegion(Function):
    @staticmethod
    def forward(ctx: _GroupContext, input_: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        return _split_last_dim(input_, group)

    @staticmethod
    def backward(ctx: _GroupContext, *grad_outputs: Tensor) -> tuple[Tensor, None]:
        (grad_output,) = grad_outputs
        return _gather_last_dim(grad_output, ctx.group), None


class _GatherFromTensorParallelRegion(Function):
    @staticmethod
    def forward(ctx: _GroupContext, input_: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        return _gather_last_dim(input_, group)

    @staticmethod
    def backward(ctx: _GroupContext, *grad_outputs: Tensor) -> tuple[Tensor, None]:
        (grad_output,) = grad_outputs
        return _split_last_dim(grad_output, ctx.group), None


class _ScatterToSequenceParallelRegion(Function):
    @staticmethod
    def forward(ctx: _GroupContext, input_: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        return _split_first_dim(input_, group)

    @staticmethod
    def backward(ctx: _GroupContext, *grad_outputs: Tensor) -> tuple[Tensor, None]:
        (grad_output,) = grad_outputs
        return _gather_first_dim(grad_output, ctx.group), None


class _GatherFromSequenceParallelRegion(Function):
    @staticmethod
    def forward(ctx: _GroupContext, input_: Tensor, group: ProcessGroup,
                tensor_parallel_output_grad: bool) -> Tensor:
        ctx.group = group
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return _gather_first_dim(input_, group)

    @staticmethod
    def backward(ctx: _GroupContext, *grad_outputs: Tensor) -> tuple[Tensor, None, None]:
        (grad_output,) = grad_outputs
        if ctx.tensor_parallel_output_grad:
            # Each rank holds a partial gradient of the gathered tensor (its layer computed
            # with its own weight slice): sum them, keep this rank's sequence slice.
            return _reduce_scatter_first_dim(grad_output, ctx.group), None, None
        return _split_first_dim(grad_output, ctx.group), None, None


class _ReduceScatterToSequenceParallelRegion(Function):
    @staticmethod
    def forward(ctx: _GroupContext, input_: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        return _reduce_scatter_first_dim(input_, group)

    @staticmethod
    def backward(ctx: _GroupContext, *grad_outputs: Tensor) -> tuple[Tensor, None]:
        (grad_output,) = grad_outputs
        return _gather_first_dim(grad_output, ctx.group), None


# -- public functions ------------------------------------------------------------------------


def copy_to_tensor_model_parallel_region(input_: Tensor, group: ProcessGroup | None) -> Tensor:
    """Enter a tensor-parallel region: identity forward, all-reduce of the gradient backward."""
    if group is None or group_size(group) == 1:
        return input_
    return apply_autograd_function(_CopyToTensorParallelRegion, input_, group)


def reduce_from_tensor_model_parallel_region(input_: Tensor, group: ProcessGroup | None) -> Tensor:
    """Leave a tensor-parallel region: all-reduce (sum) forward, identity backward."""
    if group is None or group_size(group) == 1:
        return input_
    return apply_autograd_function(_ReduceFromTensorParallelRegion, input_, group)


def scatter_to_tensor_model_parallel_region(input_: Tensor, group: ProcessGroup | None) -> Tensor:
    """`[..., n]` -> this rank's `[..., n / tp]` slice; backward all-gathers the last dim."""
    if group is None or group_size(group) == 1:
        return input_
    return apply_autograd_function(_ScatterToTensorParallelRegion, input_, group)


def gather_from_tensor_model_parallel_region(input_: Tensor, group: ProcessGroup | None) -> Tensor:
    """`[..., n / tp]` -> `[..., n]` all-gathered over the last dim; backward keeps this rank's slice."""
    if group is None or group_size(group) == 1:
        return input_
    return apply_autograd_function(_GatherFromTensorParallelRegion, input_, group)


def scatter_to_sequence_parallel_region(input_: Tensor, group: ProcessGroup | None) -> Tensor:
    """`[s, ...]` -> this rank's `[s / tp, ...]` slice; backward all-gathers dim 0."""
    if group is None or group_size(group) == 1:
        return input_
    return apply_autograd_function(_ScatterToSequenceParallelRegion, input_, group)


def gather_from_sequence_parallel_region(
    input_: Tensor, group: ProcessGroup | None, *, tensor_parallel_output_grad: bool = True
) -> Tensor:
    """`[s / tp, ...]` -> `[s, ...]` all-gathered over dim 0.

    Backward reduce-scatters the gradient (each rank's consumer holds a partial gradient, as a
    column-parallel linear's does); with `tensor_parallel_output_grad=False` the gradient is
    already complete on every rank and backward only keeps this rank's slice.
    """
    if group is None or group_size(group) == 1:
        return input_
    return apply_autograd_function(_GatherFromSequenceParallelRegion, input_, group,
                                   tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(input_: Tensor,
                                               group: ProcessGroup | None) -> Tensor:
    """`[s, ...]` partial sums -> this rank's `[s / tp, ...]` slice of the sum; backward all-gathers."""
    if group is None or group_size(group) == 1:
        return input_
    return apply_autograd_function(_ReduceScatterToSequenceParallelRegion, input_, group)
