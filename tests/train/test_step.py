"""One training step: gradient accumulation over micro-batches equals the step on the whole batch."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from protoformer.models import GPTModel
from protoformer.parallel.data_parallel import ReplicatedDataParallel
from protoformer.parallel.groups import ProcessGroups
from protoformer.train.step import micro_batch_count, train_step


def _step(model: GPTModel, rows: torch.Tensor, micro_batches: int) -> tuple[float, float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    output = train_step(ReplicatedDataParallel(model, ProcessGroups(), torch.device("cpu")),
                        optimizer, rows, micro_batches=micro_batches,
                        parameters=list(model.parameters()), grad_clip=0.5, pg=ProcessGroups(),
                        device=torch.device("cpu"))
    return float(output.loss), float(output.grad_norm)


def test_accumulated_micro_batches_give_the_whole_batch_step(
        make_gpt: Callable[..., GPTModel]) -> None:
    whole, accumulated = make_gpt(seed=3), make_gpt(seed=3)
    rows = torch.randint(0, 256, (8, 17), generator=torch.Generator().manual_seed(0))
    # The reference: the mean next-token loss of the whole batch, computed by hand.
    reference = make_gpt(seed=3)
    logits = reference(rows[:, :-1])  # [8, 16, 256]
    expected = F.cross_entropy(logits.reshape(-1, 256), rows[:, 1:].reshape(-1))
    expected.backward()  # pyright: ignore[reportUnknownMemberType]
    expected = expected.detach()
    expected_norm = torch.cat([p.grad.reshape(-1) for p in reference.parameters()
                               if p.grad is not None]).norm()

    loss_1, norm_1 = _step(whole, rows, 1)
    loss_4, norm_4 = _step(accumulated, rows, 4)
    assert loss_1 == pytest.approx(float(expected), abs=1e-5)
    assert loss_4 == pytest.approx(float(expected), abs=1e-5)
    assert norm_1 == pytest.approx(float(expected_norm), rel=1e-5)
    assert norm_4 == pytest.approx(float(expected_norm), rel=1e-5)
    for (name, a), b in zip(whole.named_parameters(), accumulated.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)  # clipped
        # AdamW divides by the gradient's running RMS, which amplifies the summation-order
        # differences of near-zero gradients: the step agrees to a tenth of the lr (1e-2).
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0, msg=name)


def test_micro_batch_count_is_global_over_micro_times_data_parallel() -> None:
    assert micro_batch_count(16, None, 2) == 1
    assert micro_batch_count(16, 2, 2) == 4
    with pytest.raises(ValueError, match="divisible by the data-parallel size 3"):
        micro_batch_count(16, None, 3)
    with pytest.raises(ValueError, match="--micro-batch-size 3 must divide"):
        micro_batch_count(16, 3, 2)
