"""Tensor-parallel linear and embedding layers, with Megatron-Core's names and call conventions.

Three linear kinds, told apart by the keyword that says how the weight is split (see
`protoformer.parallel.protocols`): `ColumnParallelLinear(gather_output=...)` splits the output
features, `RowParallelLinear(input_is_parallel=...)` splits the input features, and `Linear`
keeps the whole weight on every rank. All return `(output, bias or None)`: with `skip_bias_add`
the bias is returned for the caller to fuse into a later add.

Parameters are this rank's slice of a weight initialised in full, so a tensor-parallel model
equals the single-process one for the same seed (`protoformer.parallel.parameters`).

Deferred weight gradients: with `config.delay_wgrad_compute`, backward computes only the input
gradient and queues `(input, grad_output)`; `backward_dw()` later computes the weight gradient
(and the bias gradient when the bias is applied inside the matmul) and accumulates it into
`.grad` exactly as autograd would (`protoformer.parallel.wgrad`). A bias added after a
reduction (row-parallel) or returned with `skip_bias_add` gets its gradient from autograd as
usual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protoformer.config import TransformerConfig
from protoformer.parallel.groups import ProcessGroup, group_rank, group_size
from protoformer.parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from protoformer.parallel.parameters import (
    divide,
    mark_sequence_parallel,
    new_bias,
    new_weight,
    require_size,
)
from protoformer.parallel.protocols import InitMethod
from protoformer.parallel.wgrad import (
    PendingWeightGrad,
    accumulate_pending_weight_grads,
    linear_with_deferred_weight_grad,
)

__all__ = ["ColumnParallelLinear", "Linear", "RowParallelLinear", "VocabParallelEmbedding"]


# -- the three linear kinds ------------------------------------------------------------------


def _check_last_dim(layer: str, input_: Tensor, expected: int, what: str) -> None:
    if input_.dim() == 0 or input_.shape[-1] != expected:
        raise ValueError(f"{layer}: expected an input whose last dim is {what}={expected}, "
                         f"got shape {tuple(input_.shape)}")


class _LinearBase(nn.Module):
    """What the three linear kinds share: sizes, options, the bias, deferred weight gradients."""

    bias: nn.Parameter | None

    def __init__(self, config: TransformerConfig, input_size: int, output_size: int, *,
                 skip_bias_add: bool, is_expert: bool, tp_comm_buffer_name: str | None) -> None:
        super().__init__()
        name = type(self).__name__
        self.config = config
        self.input_size = require_size(name, "input_size", input_size)
        self.output_size = require_size(name, "output_size", output_size)
        self.skip_bias_add = skip_bias_add
        self.is_expert = is_expert
        self.tp_comm_buffer_name = tp_comm_buffer_name  # names a communication buffer in fused backends
        self._pending_weight_grads: list[PendingWeightGrad] = []

    def _create_bias(self, has_bias: bool, size: int, *, partition_dim: int | None) -> None:
        """Register this rank's bias of `size` features, or None without one."""
        if has_bias:
            self.bias = new_bias(size, partition_dim=partition_dim, config=self.config)
        else:
            self.register_parameter("bias", None)

    def _linear(self, input_: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        needs_param_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
        if self.config.delay_wgrad_compute and torch.is_grad_enabled() and needs_param_grad:
            return linear_with_deferred_weight_grad(input_, weight, bias,
                                                    self._pending_weight_grads)
        return F.linear(input_, weight, bias)

    def _linear_with_bias(self, input_: Tensor, weight: Tensor) -> tuple[Tensor, Tensor | None]:
        """`input_ @ weight.T` plus the bias, or (without it, bias) with `skip_bias_add`."""
        if self.skip_bias_add:
            return self._linear(input_, weight, None), self.bias  # [..., out]
        return self._linear(input_, weight, self.bias), None  # [..., out]

    def backward_dw(self) -> None:
        """Compute the weight gradients deferred by backward (`config.delay_wgrad_compute`).

        Accumulates into `.grad` in backward order, as autograd would have; a no-op when
        nothing is pending (always, without `delay_wgrad_compute`).
        """
        accumulate_pending_weight_grads(self._pending_weight_grads)


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
        super().__init__(config, input_size, output_size, skip_bias_add=skip_bias_add,
                         is_expert=is_expert, tp_comm_buffer_name=tp_comm_buffer_name)
        self.tp_group = tp_group
        self.output_size_per_partition = divide(type(self).__name__, "output_size", output_size,
                                                group_size(tp_group))
        self.gather_output = gather_output
        if skip_weight_param_allocation:
            self.register_parameter("weight", None)
        else:
            self.weight = new_weight((output_size, input_size), partition_dim=0,
                                     tp_group=tp_group, config=config, init_method=init_method)
        self._create_bias(bias, self.output_size_per_partition, partition_dim=0)

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
        output, bias = self._linear_with_bias(total_input, weight)  # [s, b, out / tp]
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather:
            output = gather_from_tensor_model_parallel_region(output, self.tp_group)  # [s, b, out]
        return output, bias

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
        super().__init__(config, input_size, output_size, skip_bias_add=skip_bias_add,
                         is_expert=is_expert, tp_comm_buffer_name=tp_comm_buffer_name)
        name = type(self).__name__
        self.tp_group = tp_group
        self.input_size_per_partition = divide(name, "input_size", input_size,
                                               group_size(tp_group))
        if config.sequence_parallel and not input_is_parallel:
            raise ValueError(f"{name}: config.sequence_parallel needs input_is_parallel=True (the "
                             "input must arrive split over ranks, as a column-parallel layer "
                             "leaves it)")
        self.input_is_parallel = input_is_parallel
        self.weight = new_weight((output_size, input_size), partition_dim=1, tp_group=tp_group,
                                 config=config, init_method=init_method)
        self._create_bias(bias, output_size, partition_dim=None)

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
        super().__init__(config, input_size, output_size, skip_bias_add=skip_bias_add,
                         is_expert=is_expert, tp_comm_buffer_name=tp_comm_buffer_name)
        self.weight = new_weight((output_size, input_size), partition_dim=None, tp_group=None,
                                 config=config, init_method=init_method)
        self._create_bias(bias, output_size, partition_dim=None)
        mark_sequence_parallel(self.parameters(), config.sequence_parallel)

    def forward(self, input_: Tensor) -> tuple[Tensor, Tensor | None]:
        """`[..., input_size]` -> (`[..., output_size]`, bias or None)."""
        _check_last_dim(type(self).__name__, input_, self.input_size, "input_size")
        return self._linear_with_bias(input_, self.weight)  # ([..., out], bias or None)


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
        self.num_embeddings = require_size(name, "num_embeddings", num_embeddings)
        self.embedding_dim = require_size(name, "embedding_dim", embedding_dim)
        self.config = config
        self.tp_group = tp_group
        self.reduce_scatter_embeddings = (config.sequence_parallel
                                          if reduce_scatter_embeddings is None
                                          else reduce_scatter_embeddings)
        tp_size = group_size(tp_group)
        self.num_embeddings_per_partition = divide(name, "num_embeddings", num_embeddings,
                                                   tp_size)
        self.vocab_start_index = group_rank(tp_group) * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        self.weight = new_weight((num_embeddings, embedding_dim), partition_dim=0,
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
