"""Single-process behaviour of the gradient helpers (the multi-process cases live in
tests/distributed): the global norm and clipping equal torch's, deferred gradients are found."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from protoformer import TransformerConfig
from protoformer.parallel import ColumnParallelLinear, ProcessGroups, RowParallelLinear
from protoformer.parallel.grads import (
    clip_grad_norm_,
    compute_deferred_weight_grads,
    finalize_model_grads,
    grad_norm,
    mark_duplicate_rows,
    mark_partial_grad_over_tp,
    needs_tensor_parallel_grad_sum,
)
from protoformer.parallel.parameters import ParallelMetadata, set_parallel_metadata


def two_layer(**config: object) -> nn.Sequential:
    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, **config)  # type: ignore[arg-type]
    init = partial(nn.init.normal_, std=0.5)
    torch.manual_seed(0)
    return nn.Sequential(
        ColumnParallelLinear(8, 12, config=cfg, init_method=init, bias=True, gather_output=False,
                             skip_bias_add=False),
        RowParallelLinear(12, 8, config=cfg, init_method=init, bias=True, input_is_parallel=True,
                          skip_bias_add=False))


def backward(model: nn.Sequential) -> None:
    x = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(1))
    hidden, _ = model[0](x)
    out, _ = model[1](hidden)
    out.square().sum().backward()


@pytest.mark.parametrize("max_norm", [1e-3, 1e6])
def test_clipping_equals_torch_on_one_process(max_norm: float) -> None:
    ours, theirs = two_layer(), two_layer()
    backward(ours)
    backward(theirs)
    norm = clip_grad_norm_(ours.parameters(), max_norm, ProcessGroups())
    expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
    torch.testing.assert_close(norm, expected)
    for mine, reference in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(mine.grad, reference.grad)
    with pytest.raises(ValueError, match="max_norm=0"):
        clip_grad_norm_(ours.parameters(), 0.0)


def test_duplicate_rows_are_left_out_of_the_norm() -> None:
    param = nn.Parameter(torch.zeros(4, 2))
    param.grad = torch.ones(4, 2)
    set_parallel_metadata(param, ParallelMetadata(partition_dim=0))
    mark_duplicate_rows(param, 1)
    torch.testing.assert_close(grad_norm([param]), torch.tensor(2.0 ** 0.5))  # rows 1: skipped
    with pytest.raises(ValueError, match="first_row=5"):
        mark_duplicate_rows(param, 5)


def test_deferred_weight_grads_are_computed_on_the_outermost_modules() -> None:
    deferred, eager = two_layer(delay_wgrad_compute=True), two_layer()
    backward(deferred)
    backward(eager)
    assert deferred[0].weight.grad is None  # still queued
    assert compute_deferred_weight_grads(deferred) == 2
    for mine, reference in zip(deferred.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(mine.grad, reference.grad)


def test_finalize_is_a_no_op_on_one_process_and_tags_are_read() -> None:
    model = two_layer()
    mark_partial_grad_over_tp(model[1])
    assert needs_tensor_parallel_grad_sum(model[1].weight)
    assert not needs_tensor_parallel_grad_sum(model[0].weight)
    backward(model)
    before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    finalize_model_grads(model, ProcessGroups(), reduce_data_parallel=True)
    after = [p.grad for p in model.parameters() if p.grad is not None]
    for old, new in zip(before, after, strict=True):
        assert torch.equal(old, new)
