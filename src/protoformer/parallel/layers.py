"""Tensor-parallel linear and embedding layers, with Megatron-Core's names and call conventions.

Three linear kinds, told apart by the keyword that says how the weight is split (see
`protoformer.parallel.protocols`): `ColumnParallelLinear(gather_output=...)` splits the output
features, `RowParallelLinear(input_is_parallel=...)` splits the input features, and `Linear`
keeps the whole weight on every rank. All return `(output, bias or None)`: with `skip_bias_add`
the bias is returned for the caller to fuse into a later add.

Initialisation: every rank initialises the *full* weight with `init_method` and keeps its own
slice, so a model built after the same `torch.manual_seed` equals the single-process model
whatever the tensor-parallel size (the default RNG must be in the same state on every
tensor-parallel rank, as `protoformer.parallel.random.model_parallel_manual_seed` leaves it;
each rank briefly holds one full-size weight while it initialises).
Parameters are created on the default device (`torch.set_default_device` or a
`with torch.device(...)` block; on the `meta` device nothing is initialised).

Deferred weight gradients: with `config.delay_wgrad_compute`, backward computes only the input
gradient and queues `(input, grad_output)`; `backward_dw()` later computes the weight gradient
(and the bias gradient when the bias is applied inside the matmul) and accumulates it into
`.grad` exactly as autograd would. A bias added after a reduction (row-parallel) or returned
with `skip_bias_add` gets its gradient from autograd as usual. Hooks on gradient accumulation
(`register_post_accumulate_grad_hook`) do not fire for deferred gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function
from torch.autograd.function import FunctionCtx

from protoformer.config import TransformerConfig
from protoformer.parallel.groups import ProcessGroup, group_rank, group_size
from protoformer.parallel.mappings import (
    apply_autograd_function,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from protoformer.parallel.protocols import InitMethod

__all__ = ["ColumnParallelLinear", "Linear", "RowParallelLinear", "VocabParallelEmbedding"]


# -- construction helpers --------------------------------------------------------------------


def _require_size(layer: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{layer}: {name}={value!r} must be a positive int")
    return value


def _divide(layer: str, name: str, value: int, tp_size: int) -> int:
    if value % tp_size != 0:
        raise ValueError(
            f"{layer}: {name}={value} is not divisible by the tensor-parallel size {tp_size}; "
            f"each rank holds {name} / {tp_size}, so choose a multiple of {tp_size} (pad the "
            "vocabulary, or pick head and hidden sizes that split evenly)")
    return value // tp_size


def _new_weight(full_shape: tuple[int, int], *, partition_dim: int | None,
                tp_group: ProcessGroup | None, config: TransformerConfig,
                init_method: InitMethod) -> nn.Parameter:
    """This rank's slice (along `partition_dim`; None = replicated) of a `full_shape` weight."""
    tp_size, tp_rank = group_size(tp_group), group_rank(tp_group)
    local_shape = list(full_shape)
    if partition_dim is not None:
        local_shape[partition_dim] //= tp_size
    weight = torch.empty(local_shape, dtype=config.params_dtype)  # on the default device
    if config.perform_initialization and not weight.is_meta:
        with torch.no_grad():
            if partition_dim is None or tp_size == 1:
                init_method(weight)
            else:
                # The same full weight on every rank (same RNG state), then this rank's slice:
                # equal to the single-process weight for the same seed.
                master = torch.empty(full_shape, dtype=weight.dtype, device=weight.device)
                init_method(master)
                weight.copy_(master.chunk(tp_size, dim=partition_dim)[tp_rank])
    parameter = nn.Parameter(weight)
    _mark_parameter(parameter, partition_dim=partition_dim)
    return parameter


def _new_bias(size: int, *, partition_dim: int | None, config: TransformerConfig) -> nn.Parameter:
    parameter = nn.Parameter(torch.zeros(size, dtype=config.params_dtype))
    _mark_parameter(parameter, partition_dim=partition_dim)
    return parameter


def _mark_parameter(parameter: nn.Parameter, *, partition_dim: int | None) -> None:
    """Megatron-Core's attributes telling checkpoint and conversion code how a parameter is split."""
    attributes: dict[str, object] = {
        "tensor_model_parallel": partition_dim is not None,
        "partition_dim": -1 if partition_dim is None else partition_dim,
        "partition_stride": 1,
    }
    for name, value in attributes.items():
        _set_attribute(parameter, name, value)


def _set_attribute(parameter: nn.Parameter, name: str, value: object) -> None:
    setattr(parameter, name, value)


def _check_last_dim(layer: str, input_: Tensor, expected: int, what: str) -> None:
    if input_.dim() == 0 or input_.shape[-1] != expected:
        raise ValueError(f"{layer}: expected an input whose last dim is {what}={expected}, "
                         f"got shape {tuple(input_.shape)}")


# -- deferred weight gradients ---------------------------------------------------------------


@dataclass
class _PendingWeightGrad:
    """One backward pass's inputs to the weight gradient, kept until `backward_dw()`."""

    input: Tensor  # [n, in]
    grad_output: Tensor  # [n, out]
    weight: Tensor | None  # None when its gradient was computed in backward
    bias: Tensor | None  # None when there is no bias or its gradient was computed in backward


class _LinearContext(FunctionCtx):
    """What `_LinearWithDeferredWeightGrad` keeps for backward (a static view of torch's context)."""

    saved_tensors: tuple[Tensor, ...]
    needs_input_grad: tuple[bool, ...]
    bias: Tensor | None
    pending: list[_PendingWeightGrad]


class _LinearWithDeferredWeightGrad(Function):
    """`F.linear` whose backward returns only the input gradient and queues the weight's."""

    @staticmethod
    def forward(ctx: _LinearContext, input_: Tensor, weight: Tensor, bias: Tensor | None,
                pending: list[_PendingWeightGrad]) -> Tensor:
        ctx.save_for_backward(input_, weight)
        ctx.bias = bias
        ctx.pending = pending
        return F.linear(input_, weight, bias)  # [..., out]

    @staticmethod
    def backward(ctx: _LinearContext, *grad_outputs: Tensor
                 ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        (grad_output,) = grad_outputs  # [..., out]
        input_, weight = ctx.saved_tensors
        bias = ctx.bias
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_input = None
        if needs_input:
            grad_input = grad_output.matmul(weight.to(grad_output.dtype)).to(input_.dtype)  # [..., in]
        grad_2d = grad_output.reshape(-1, grad_output.shape[-1])  # [n, out]
        input_2d = input_.reshape(-1, input_.shape[-1]).to(grad_2d.dtype)  # [n, in]
        # Only leaves can be given a gradient later; a computed weight (a cast, a tied view)
        # gets its gradient now, through autograd.
        defer_weight = needs_weight and weight.is_leaf
        defer_bias = needs_bias and bias is not None and bias.is_leaf
        grad_weight = grad_bias = None
        if needs_weight and not defer_weight:
            grad_weight = grad_2d.t().mm(input_2d).to(weight.dtype)  # [out, in]
        if needs_bias and not defer_bias and bias is not None:
            grad_bias = grad_2d.sum(0).to(bias.dtype)  # [out]
        if defer_weight or defer_bias:
            ctx.pending.append(_PendingWeightGrad(
                input=input_2d, grad_output=grad_2d,
                weight=weight if defer_weight else None,
                bias=bias if defer_bias else None))
        return grad_input, grad_weight, grad_bias, None


def _accumulate_grad(parameter: Tensor, grad: Tensor) -> None:
    """Add `grad` to `parameter.grad` as autograd's accumulation does (set, else add in place)."""
    existing = parameter.grad
    if existing is None:
        parameter.grad = grad
    else:
        existing.add_(grad)


class _LinearBase(nn.Module):
    """The config and the deferred-weight-gradient queue shared by the three linear kinds."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self._pending_weight_grads: list[_PendingWeightGrad] = []

    def _linear(self, input_: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        needs_param_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
        if self.config.delay_wgrad_compute and torch.is_grad_enabled() and needs_param_grad:
            return apply_autograd_function(_LinearWithDeferredWeightGrad, input_, weight, bias,
                                           self._pending_weight_grads)
        return F.linear(input_, weight, bias)

    def backward_dw(self) -> None:
        """Compute the weight gradients deferred by backward (`config.delay_wgrad_compute`).

        Accumulates into `.grad` in backward order, as autograd would have; a no-op when
        nothing is pending (always, without `delay_wgrad_compute`).
        """
        pending = list(self._pending_weight_grads)
        self._pending_weight_grads.clear()  # in place: queued autograd nodes hold this list
        with torch.no_grad():
            for entry in pending:
                if entry.weight is not None:
                    grad_weight = entry.grad_output.t().mm(entry.input)  # [out, in]
                    _accumulate_grad(entry.weight, grad_weight.to(entry.weight.dtype))
                if entry.bias is not None:
                    grad_bias = entry.grad_output.sum(0)  # [out]
                    _accumulate_grad(entry.bias, grad_bias.to(entry.bias.dtype))


# -- the three linear kinds ------------------------------------------------------------------


class ColumnParallelLinear(_LinearBase):
    """A linear layer whose output features are split across tensor-parallel ranks.

    Weight `[output_size / tp, input_size]`. `forward` maps `[s, b, input_size]` (with
    `config.sequence_parallel`, this rank's `[s / tp, b, input_size]`, all-gathered first) to
    `[s, b, output_size / tp]`, or `[s, b, output_size]` with `gather_output`. For a weight
    tied to another layer (an output layer sharing the embedding), build with
    `skip_weight_param_allocation=True` and pass `weight=` to `forward`.
    """

    weight: nn.Parameter | None
    bias: nn.Parameter | None

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: TransformerConfig,
        init_method: InitMethod,
        bias: bool,
        gather_output: bool,
        skip_bias_add: bool,
        is_expert: bool = False,
        tp_comm_buffer_name: str | None = None,
        tp_group: ProcessGroup | None = None,
        skip_weight_param_allocation: bool = False,
    ) -> None:
        super().__init__(config)
        name = type(self).__name__
        self.input_size = _require_size(name, "input_size", input_size)
        self.output_size = _require_size(name, "output_size", output_size)
        self.tp_group = tp_group
        self.output_size_per_partition = _divide(name, "output_size", output_size,
                                                 group_size(tp_group))
        self.gather_output = gather_output
        self.skip_bias_add = skip_bias_add
        self.is_expert = is_expert
        self.tp_comm_buffer_name = tp_comm_buffer_name  # names a communication buffer in fused backends
        if skip_weight_param_allocation:
            self.register_parameter("weight", None)
        else:
            self.weight = _new_weight((output_size, input_size), partition_dim=0,
                                      tp_group=tp_group, config=config, init_method=init_method)
        if bias:
            self.bias = _new_bias(self.output_size_per_partition, partition_dim=0, config=config)
        else:
            self.register_parameter("bias", None)

    def forward(self, input_: Tensor, *, weight: Tensor | None = None,
                runtime_gather_output: bool | None = None) -> tuple[Tensor, Tensor | None]:
        """`[s, b, input_size]` -> (`[s, b, output_size / tp]` or gathered, bias or None)."""
        name = type(self).__name__
        weight = self._weight_for_forward(weight)
        _check_last_dim(name, input_, self.input_size, "input_size")
        if self.config.sequence_parallel:
            total_input = gather_from_sequence_parallel_region(input_, self.tp_group)  # [s, b, in]
        else:
            total_input = copy_to_tensor_model_parallel_region(input_, self.tp_group)  # [s, b, in]
        bias = None if self.skip_bias_add else self.bias
        output = self._linear(total_input, weight, bias)  # [s, b, out / tp]
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather:
            output = gather_from_tensor_model_parallel_region(output, self.tp_group)  # [s, b, out]
        return output, (self.bias if self.skip_bias_add else None)

    def _weight_for_forward(self, weight: Tensor | None) -> Tensor:
        name = type(self).__name__
        expected = (self.output_size_per_partition, self.input_size)
        if weight is None:
            if self.weight is None:
                raise ValueError(f"{name} was built with skip_weight_param_allocation=True; pass "
                                 f"the weight ({list(expected)}) as forward(..., weight=...)")
            return self.weight
        if tuple(weight.shape) != expected:
            raise ValueError(f"{name}.forward: weight= has shape {tuple(weight.shape)}, expected "
                             f"{expected} ([output_size / tp, input_size])")
        return weight


class RowParallelLinear(_LinearBase):
    """A linear layer whose input features are split across tensor-parallel ranks.

    Weight `[output_size, input_size / tp]`. `forward` maps `[s, b, input_size / tp]` (or the
    full `[s, b, input_size]`, split here, when `input_is_parallel=False`) to `[s, b,
    output_size]` all-reduced over ranks, or this rank's `[s / tp, b, output_size]`
    reduce-scattered with `config.sequence_parallel`. The bias is added once, after the
    reduction; with sequence parallelism its gradient is summed over ranks in backward.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None

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
        super().__init__(config)
        name = type(self).__name__
        self.input_size = _require_size(name, "input_size", input_size)
        self.output_size = _require_size(name, "output_size", output_size)
        self.tp_group = tp_group
        self.input_size_per_partition = _divide(name, "input_size", input_size,
                                                group_size(tp_group))
        if config.sequence_parallel and not input_is_parallel:
            raise ValueError(f"{name}: config.sequence_parallel needs input_is_parallel=True (the "
                             "input must arrive split over ranks, as a column-parallel layer "
                             "leaves it)")
        self.input_is_parallel = input_is_parallel
        self.skip_bias_add = skip_bias_add
        self.is_expert = is_expert
        self.tp_comm_buffer_name = tp_comm_buffer_name  # names a communication buffer in fused backends
        self.weight = _new_weight((output_size, input_size), partition_dim=1, tp_group=tp_group,
                                  config=config, init_method=init_method)
        if bias:
            self.bias = _new_bias(output_size, partition_dim=None, config=config)
        else:
            self.register_parameter("bias", None)

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor | None]:
        """`[s, b, input_size / tp]` -> (`[s, b, output_size]` reduced over ranks, bias or None)."""
        name = type(self).__name__
        if self.input_is_parallel:
            _check_last_dim(name, hidden_states, self.input_size_per_partition,
                            "input_size / tp")
            input_parallel = hidden_states
        else:
            _check_last_dim(name, hidden_states, self.input_size, "input_size")
            input_parallel = scatter_to_tensor_model_parallel_region(
                hidden_states, self.tp_group)  # [s, b, in / tp]
        output_parallel = self._linear(input_parallel, self.weight, None)  # [s, b, out], partial
        if self.config.sequence_parallel:
            output = reduce_scatter_to_sequence_parallel_region(
                output_parallel, self.tp_group)  # [s / tp, b, out]
        else:
            output = reduce_from_tensor_model_parallel_region(output_parallel, self.tp_group)
        bias: Tensor | None = self.bias
        if bias is not None and self.config.sequence_parallel:
            # Each rank adds the bias to its own sequence slice; summing the bias gradient over
            # ranks in backward makes it the whole sequence's (as on one rank).
            bias = copy_to_tensor_model_parallel_region(bias, self.tp_group)
        if self.skip_bias_add:
            return output, bias
        return (output if bias is None else output + bias), None


class Linear(_LinearBase):
    """A linear layer whose weight `[output_size, input_size]` is replicated on every rank.

    No communication: `[..., input_size]` -> `[..., output_size]`. Used where a projection is
    too small to split (multi-latent attention's down-projections). With
    `config.sequence_parallel` each rank sees only its sequence slice, so its gradients are
    partial sums: its parameters carry `sequence_parallel = True` and the training loop must
    all-reduce their gradients over the tensor-parallel group (as Megatron-Core does).
    """

    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: TransformerConfig,
        init_method: InitMethod,
        bias: bool,
        skip_bias_add: bool,
        is_expert: bool = False,
        tp_comm_buffer_name: str | None = None,
    ) -> None:
        super().__init__(config)
        name = type(self).__name__
        self.input_size = _require_size(name, "input_size", input_size)
        self.output_size = _require_size(name, "output_size", output_size)
        self.skip_bias_add = skip_bias_add
        self.is_expert = is_expert
        self.tp_comm_buffer_name = tp_comm_buffer_name  # names a communication buffer in fused backends
        self.weight = _new_weight((output_size, input_size), partition_dim=None, tp_group=None,
                                  config=config, init_method=init_method)
        if bias:
            self.bias = _new_bias(output_size, partition_dim=None, config=config)
        else:
            self.register_parameter("bias", None)
        for parameter in self.parameters():
            _set_attribute(parameter, "sequence_parallel", config.sequence_parallel)

    def forward(self, input_: Tensor) -> tuple[Tensor, Tensor | None]:
        """`[..., input_size]` -> (`[..., output_size]`, bias or None)."""
        _check_last_dim(type(self).__name__, input_, self.input_size, "input_size")
        bias = None if self.skip_bias_add else self.bias
        output = self._linear(input_, self.weight, bias)  # [..., out]
        return output, (self.bias if self.skip_bias_add else None)


# -- embedding -------------------------------------------------------------------------------


class VocabParallelEmbedding(nn.Module):
    """A token embedding whose vocabulary rows are split across tensor-parallel ranks.

    Weight `[num_embeddings / tp, embedding_dim]`: rank `r` holds ids `[r * v / tp, (r + 1) *
    v / tp)`. `forward` maps ids `[b, s]` to `[b, s, embedding_dim]`: each rank looks up the
    ids it holds (others give zeros) and the ranks' results are summed. With
    `reduce_scatter_embeddings` (default: `config.sequence_parallel`) the sum is
    reduce-scattered over the sequence instead and the result is this rank's `[b, s / tp,
    embedding_dim]` slice. Either way the caller transposes to `[s, b, h]`, which is then
    contiguous without a copy in the reduce-scattered case.

    Ids outside `[0, num_embeddings)` raise `ValueError` when the ids are on the CPU (a
    min/max check). On an accelerator the check is skipped, since reading the result would
    stall the device: out-of-range ids then give zero vectors (tp > 1) or a device-side error.
    """

    weight: nn.Parameter

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        init_method: InitMethod,
        config: TransformerConfig,
        tp_group: ProcessGroup | None = None,
        reduce_scatter_embeddings: bool | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.num_embeddings = _require_size(name, "num_embeddings", num_embeddings)
        self.embedding_dim = _require_size(name, "embedding_dim", embedding_dim)
        self.config = config
        self.tp_group = tp_group
        self.reduce_scatter_embeddings = (config.sequence_parallel
                                          if reduce_scatter_embeddings is None
                                          else reduce_scatter_embeddings)
        tp_size = group_size(tp_group)
        self.num_embeddings_per_partition = _divide(name, "num_embeddings", num_embeddings,
                                                    tp_size)
        self.vocab_start_index = group_rank(tp_group) * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        self.weight = _new_weight((num_embeddings, embedding_dim), partition_dim=0,
                                  tp_group=tp_group, config=config, init_method=init_method)

    def forward(self, input_: Tensor) -> Tensor:
        """Token ids `[b, s]` -> embeddings `[b, s, h]` (`[b, s / tp, h]` when reduce-scattered)."""
        self._check_ids(input_)
        tp_size = group_size(self.tp_group)
        if tp_size > 1:
            outside = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
            local_ids = (input_ - self.vocab_start_index).masked_fill(outside, 0)
            output = F.embedding(local_ids, self.weight)  # [b, s, h], partial
            output = output.masked_fill(outside.unsqueeze(-1), 0.0)
        else:
            output = F.embedding(input_, self.weight)  # [b, s, h]
        if self.reduce_scatter_embeddings and tp_size > 1:
            output = reduce_scatter_to_sequence_parallel_region(
                output.transpose(0, 1).contiguous(), self.tp_group)  # [s / tp, b, h]
            return output.transpose(0, 1)  # [b, s / tp, h]
        return reduce_from_tensor_model_parallel_region(output, self.tp_group)  # [b, s, h]

    def _check_ids(self, input_: Tensor) -> None:
        name = type(self).__name__
        if input_.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name}: token ids must be int64 or int32, got {input_.dtype}")
        if self.reduce_scatter_embeddings and input_.dim() != 2:
            raise ValueError(f"{name}: with reduce_scatter_embeddings the ids must be [b, s], "
                             f"got shape {tuple(input_.shape)}")
        if input_.device.type != "cpu" or input_.numel() == 0:
            return
        low, high = (int(v) for v in torch.aminmax(input_))
        if low < 0 or high >= self.num_embeddings:
            raise ValueError(
                f"{name}: token ids must lie in [0, {self.num_embeddings}), got ids from {low} "
                f"to {high}; check the tokenizer's vocabulary size against num_embeddings (pad "
                "the vocabulary to cover every id)")
