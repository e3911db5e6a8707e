"""Tensor parallelism on 2 gloo processes equals the single-process computation.

Each rank builds the single-process layer (tp_group=None) and the tensor-parallel one after the
same seed, runs both on the same data, and checks its own slice of every output and gradient.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from protoformer import TransformerConfig
from protoformer.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from protoformer.parallel import mappings as m
from protoformer.parallel.groups import ProcessGroup
from tests.parallel.dist_utils import run_distributed

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")

ATOL = 1e-5
init = partial(nn.init.normal_, std=0.5)


def tp_group(world_size: int) -> ProcessGroup:
    # All ranks form one tensor-parallel group. (ProcessGroups.from_torchrun would do, but it
    # rejects the placeholder new_group returns to ranks outside a group, e.g. the DP groups.)
    group = dist.new_group(list(range(world_size)))
    assert isinstance(group, ProcessGroup)
    return group


def sequence_slice(t: Tensor, dim: int, rank: int, world_size: int, sequence_parallel: bool) -> Tensor:
    """This rank's slice of the sequence dim with sequence parallelism, else the whole tensor."""
    return t.chunk(world_size, dim)[rank] if sequence_parallel else t


def make_config(**overrides: object) -> TransformerConfig:
    return TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, **overrides)  # type: ignore[arg-type]


def close(actual: Tensor | None, expected: Tensor | None, what: str) -> None:
    assert actual is not None and expected is not None, what
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def grad(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.grad


# -- mappings --------------------------------------------------------------------------------


def check_mappings(rank: int, world_size: int) -> None:
    group = tp_group(world_size)
    ranks = range(world_size)

    def local(r: int, scale: float = 1.0) -> Tensor:  # a different [4, 2, 4] tensor per rank
        return (torch.arange(32.0).reshape(4, 2, 4) + 100 * r) * scale

    def run(fn: Callable[..., Tensor], x: Tensor, upstream: Tensor, **kwargs: object) -> tuple[Tensor, Tensor]:
        x = x.clone().requires_grad_()
        y = fn(x, group, **kwargs)
        y.backward(upstream)
        assert x.grad is not None
        return y.detach(), x.grad

    same = local(0)  # the same on every rank
    y, g = run(m.copy_to_tensor_model_parallel_region, same, local(rank))
    close(y, same, "copy forward")
    close(g, sum(local(r) for r in ranks), "copy backward")

    y, g = run(m.reduce_from_tensor_model_parallel_region, local(rank), same)
    close(y, sum(local(r) for r in ranks), "reduce forward")
    close(g, same, "reduce backward")

    y, g = run(m.scatter_to_tensor_model_parallel_region, same, local(rank)[..., :2])
    close(y, same.chunk(world_size, -1)[rank], "scatter-last forward")
    close(g, torch.cat([local(r)[..., :2] for r in ranks], -1), "scatter-last backward")

    y, g = run(m.gather_from_tensor_model_parallel_region, local(rank), torch.ones(4, 2, 8))
    close(y, torch.cat([local(r) for r in ranks], -1), "gather-last forward")
    close(g, torch.ones(4, 2, 4), "gather-last backward")

    y, g = run(m.scatter_to_sequence_parallel_region, same, local(rank)[:2])
    close(y, same.chunk(world_size, 0)[rank], "scatter-seq forward")
    close(g, torch.cat([local(r)[:2] for r in ranks], 0), "scatter-seq backward")

    upstream = local(rank, 0.5).repeat(2, 1, 1)  # [8, 2, 4], different per rank
    y, g = run(m.gather_from_sequence_parallel_region, local(rank), upstream)
    close(y, torch.cat([local(r) for r in ranks], 0), "gather-seq forward")
    summed = sum(local(r, 0.5).repeat(2, 1, 1) for r in ranks)
    assert isinstance(summed, Tensor)
    close(g, summed.chunk(world_size, 0)[rank], "gather-seq backward (reduce-scatter)")
    y, g = run(m.gather_from_sequence_parallel_region, local(rank), upstream,
               tensor_parallel_output_grad=False)
    close(g, upstream.chunk(world_size, 0)[rank], "gather-seq backward (split)")

    y, g = run(m.reduce_scatter_to_sequence_parallel_region, local(rank), local(rank)[:2])
    total = sum(local(r) for r in ranks)
    assert isinstance(total, Tensor)
    close(y, total.chunk(world_size, 0)[rank], "reduce-scatter forward")
    close(g, torch.cat([local(r)[:2] for r in ranks], 0), "reduce-scatter backward")

    with pytest.raises(ValueError, match="multiple of 2"):
        m.reduce_scatter_to_sequence_parallel_region(torch.ones(3, 2), group)

    maxed = m.all_reduce_in_place(torch.tensor([float(rank)]), group, op="max")
    close(maxed, torch.tensor([float(world_size - 1)]), "all-reduce max")


def test_mappings_on_two_ranks() -> None:
    run_distributed(check_mappings, 2, timeout_s=120)


# -- column-parallel then row-parallel linear ------------------------------------------------


def column_row(config: TransformerConfig, group: ProcessGroup | None, *, gather_output: bool,
               ) -> tuple[ColumnParallelLinear, RowParallelLinear]:
    torch.manual_seed(0)  # the same full weights in both models
    col = ColumnParallelLinear(8, 12, config=config, init_method=init, bias=True,
                               gather_output=gather_output, skip_bias_add=False, tp_group=group)
    row = RowParallelLinear(12, 8, config=config, init_method=init, bias=True,
                            input_is_parallel=not gather_output, skip_bias_add=False,
                            tp_group=group)
    return col, row


def check_column_row(rank: int, world_size: int) -> None:
    group = tp_group(world_size)
    cases = [
        {"sequence_parallel": sp, "delay_wgrad_compute": delay, "gather_output": False}
        for sp in (False, True) for delay in (False, True)
    ] + [{"sequence_parallel": False, "delay_wgrad_compute": False, "gather_output": True}]
    for case in cases:
        gather_output = bool(case.pop("gather_output"))
        sp = bool(case["sequence_parallel"])
        what = f"{case}, gather_output={gather_output}"
        ref_col, ref_row = column_row(make_config(), None, gather_output=False)
        col, row = column_row(make_config(**case), group, gather_output=gather_output)
        # Initialisation: each rank holds its slice of the single-process weights.
        assert ref_col.weight is not None and col.weight is not None
        assert torch.equal(col.weight, ref_col.weight.chunk(world_size, 0)[rank]), what
        assert torch.equal(row.weight, ref_row.weight.chunk(world_size, 1)[rank]), what
        with torch.no_grad():  # non-zero biases, so that their use is checked too
            for ref_layer, layer, dim in ((ref_col, col, 0), (ref_row, row, None)):
                assert ref_layer.bias is not None and layer.bias is not None
                ref_layer.bias.copy_(torch.linspace(-1, 1, ref_layer.bias.numel()))
                full = ref_layer.bias
                layer.bias.copy_(full if dim is None else full.chunk(world_size, dim)[rank])

        generator = torch.Generator().manual_seed(1)
        x = torch.randn(4, 3, 8, generator=generator)  # [s, b, h]
        upstream = torch.randn(4, 3, 8, generator=generator)

        ref_x = x.clone().requires_grad_()
        ref_out = ref_row(ref_col(ref_x)[0])[0]
        ref_out.backward(upstream)

        mine = partial(sequence_slice, dim=0, rank=rank, world_size=world_size, sequence_parallel=sp)
        tp_x = mine(x).clone().requires_grad_()
        out = row(col(tp_x)[0])[0]
        out.backward(mine(upstream))
        col.backward_dw()
        row.backward_dw()

        close(out, mine(ref_out.detach()), f"output ({what})")
        close(tp_x.grad, mine(ref_x.grad) if ref_x.grad is not None else None, f"input grad ({what})")
        ref_col_w = grad(ref_col.weight)
        assert ref_col_w is not None
        close(grad(col.weight), ref_col_w.chunk(world_size, 0)[rank], f"column weight grad ({what})")
        ref_col_b = grad(ref_col.bias)
        assert ref_col_b is not None
        close(grad(col.bias), ref_col_b.chunk(world_size, 0)[rank], f"column bias grad ({what})")
        ref_row_w = grad(ref_row.weight)
        assert ref_row_w is not None
        close(grad(row.weight), ref_row_w.chunk(world_size, 1)[rank], f"row weight grad ({what})")
        close(grad(row.bias), grad(ref_row.bias), f"row bias grad ({what})")

    with pytest.raises(ValueError, match="not divisible by the tensor-parallel size 2"):
        ColumnParallelLinear(8, 5, config=make_config(), init_method=init, bias=True,
                             gather_output=False, skip_bias_add=False, tp_group=group)


def test_column_then_row_parallel_equal_single_process() -> None:
    run_distributed(check_column_row, 2, timeout_s=120)


# -- embedding and cross-entropy -------------------------------------------------------------


def check_embedding_and_cross_entropy(rank: int, world_size: int) -> None:
    group = tp_group(world_size)
    vocab, hidden = 16, 8
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (3, 4), generator=generator)  # [b, s]
    upstream = torch.randn(3, 4, hidden, generator=generator)
    for sp in (False, True):
        torch.manual_seed(3)
        ref = VocabParallelEmbedding(vocab, hidden, init_method=init, config=make_config())
        torch.manual_seed(3)
        emb = VocabParallelEmbedding(vocab, hidden, init_method=init,
                                     config=make_config(sequence_parallel=sp), tp_group=group)
        assert torch.equal(emb.weight, ref.weight.chunk(world_size, 0)[rank])
        ref_out = ref(ids)  # [b, s, h]
        ref_out.backward(upstream)
        out = emb(ids)

        mine = partial(sequence_slice, dim=1, rank=rank, world_size=world_size, sequence_parallel=sp)
        close(out, mine(ref_out.detach()), f"embedding output (sp={sp})")
        out.backward(mine(upstream))
        ref_grad = ref.weight.grad
        assert ref_grad is not None
        close(emb.weight.grad, ref_grad.chunk(world_size, 0)[rank], f"embedding grad (sp={sp})")

    with pytest.raises(ValueError, match="not divisible"):
        VocabParallelEmbedding(7, hidden, init_method=init, config=make_config(), tp_group=group)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        emb(torch.tensor([[16]]))

    logits = torch.randn(4, 3, vocab, generator=generator) * 3  # [s, b, v]
    target = torch.randint(0, vocab, (4, 3), generator=generator)
    weights = torch.rand(4, 3, generator=generator)
    for label_smoothing in (0.0, 0.1):
        ref_logits = logits.clone().requires_grad_()
        ref_loss = F.cross_entropy(ref_logits.reshape(-1, vocab), target.reshape(-1),
                                   reduction="none", label_smoothing=label_smoothing).reshape(4, 3)
        (ref_loss * weights).sum().backward()
        assert ref_logits.grad is not None
        local = logits.chunk(world_size, -1)[rank].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(local, target, group, label_smoothing=label_smoothing)
        (loss * weights).sum().backward()
        close(loss, ref_loss.detach(), f"cross-entropy loss (eps={label_smoothing})")
        close(local.grad, ref_logits.grad.chunk(world_size, -1)[rank],
              f"cross-entropy grad (eps={label_smoothing})")


def test_embedding_and_cross_entropy_equal_single_process() -> None:
    run_distributed(check_embedding_and_cross_entropy, 2, timeout_s=120)


# -- the harness reports failures ------------------------------------------------------------


def fail_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise AssertionError("rank one says no")


def test_harness_reports_the_failing_rank() -> None:
    with pytest.raises(RuntimeError, match=r"(?s)failed on rank 1.*rank one says no"):
        run_distributed(fail_on_rank_one, 2, timeout_s=60)


def hang(rank: int, world_size: int) -> None:
    time.sleep(60)


def test_harness_gives_up_after_the_timeout() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] still running"):
        run_distributed(hang, 2, timeout_s=1.5)
    assert time.monotonic() - started < 30


def test_harness_retries_once_when_the_group_never_came_up() -> None:
    # An unknown backend fails inside init_process_group on every rank, on both attempts.
    with pytest.raises(RuntimeError, match=r"(?s)failed on rank.*\(first attempt\)"):
        run_distributed(fail_on_rank_one, 2, timeout_s=60, backend="no-such-backend")
