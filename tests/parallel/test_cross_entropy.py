"""vocab_parallel_cross_entropy on one process against torch.nn.functional.cross_entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from protoformer.parallel import vocab_parallel_cross_entropy


def reference(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    s, b, v = logits.shape
    loss = F.cross_entropy(logits.reshape(s * b, v), target.reshape(s * b), reduction="none",
                           label_smoothing=label_smoothing)
    return loss.reshape(s, b)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_loss_and_gradient_equal_torch_cross_entropy(label_smoothing: float) -> None:
    torch.manual_seed(0)
    logits = (torch.randn(5, 3, 11) * 4).requires_grad_()
    target = torch.randint(0, 11, (5, 3))
    upstream = torch.rand(5, 3)

    loss = vocab_parallel_cross_entropy(logits, target, None, label_smoothing=label_smoothing)
    assert loss.shape == (5, 3) and loss.dtype == torch.float32
    (loss * upstream).sum().backward()

    ref_logits = logits.detach().clone().requires_grad_()
    ref_loss = reference(ref_logits, target, label_smoothing)
    (ref_loss * upstream).sum().backward()

    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits.grad, ref_logits.grad, atol=1e-6, rtol=1e-6)


def test_large_logits_do_not_overflow() -> None:
    logits = torch.tensor([[[1000.0, 0.0, -1000.0]]])
    loss = vocab_parallel_cross_entropy(logits, torch.tensor([[1]]), None)
    torch.testing.assert_close(loss, torch.tensor([[1000.0]]))


def test_low_precision_logits_give_float32_loss_and_matching_gradient_dtype() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 2, 7).to(torch.bfloat16).requires_grad_()
    target = torch.randint(0, 7, (4, 2))
    loss = vocab_parallel_cross_entropy(logits, target, None)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference(logits.detach().float(), target, 0.0))
    loss.sum().backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16


def test_a_second_backward_through_a_retained_graph_gives_the_same_gradient() -> None:
    logits = torch.randn(3, 2, 5, requires_grad=True)
    loss = vocab_parallel_cross_entropy(logits, torch.randint(0, 5, (3, 2)), None).sum()
    loss.backward(retain_graph=True)
    assert logits.grad is not None
    first = logits.grad.clone()
    loss.backward()
    torch.testing.assert_close(logits.grad, 2 * first)


@pytest.mark.parametrize("bad_id", [-100, 5])
def test_target_outside_the_vocabulary_is_rejected(bad_id: int) -> None:
    with pytest.raises(ValueError, match=r"must lie in \[0, 5\)"):
        vocab_parallel_cross_entropy(torch.randn(2, 1, 5), torch.tensor([[0], [bad_id]]), None)


def test_target_shape_must_match_logits() -> None:
    with pytest.raises(ValueError, match="target shape"):
        vocab_parallel_cross_entropy(torch.randn(2, 1, 5), torch.zeros(1, 2, dtype=torch.long), None)
