"""The tensor-parallel mappings are the identity on one process (no torch.distributed needed).

Their multi-rank behaviour is checked in test_multiprocess.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist

from protoformer.parallel import mappings

MAPPINGS = [
    mappings.copy_to_tensor_model_parallel_region,
    mappings.reduce_from_tensor_model_parallel_region,
    mappings.scatter_to_tensor_model_parallel_region,
    mappings.gather_from_tensor_model_parallel_region,
    mappings.scatter_to_sequence_parallel_region,
    mappings.gather_from_sequence_parallel_region,
    mappings.reduce_scatter_to_sequence_parallel_region,
]


@pytest.mark.parametrize("mapping", MAPPINGS, ids=lambda m: m.__name__)
def test_mapping_is_the_identity_without_a_group(mapping: Callable[..., torch.Tensor]) -> None:
    assert not dist.is_initialized()
    x = torch.randn(4, 3, requires_grad=True)
    y = mapping(x, None)
    assert y is x
    y.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.ones(4, 3))


def test_all_reduce_in_place_is_a_no_op_without_a_group() -> None:
    x = torch.randn(3)
    assert mappings.all_reduce_in_place(x, None, op="max") is x
