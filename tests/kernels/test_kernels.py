"""The fused kernels against independent references: rotary embedding, linear + cross-entropy,
RMSNorm and SwiGLU. CPU tests check the PyTorch paths; GPU tests (skipped without CUDA) check
the Triton / liger-kernel paths against the same references in float32 and bfloat16."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from protoformer.kernels import (
    fused_apply_rotary_pos_emb,
    fused_linear_cross_entropy,
    fused_rms_norm,
    fused_swiglu,
    liger_available,
)
from protoformer.kernels.linear_cross_entropy import default_chunk_size
from protoformer.kernels.rope import fused_apply_rotary_pos_emb_pair

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def naive_rope(t: Tensor, positions: Tensor, rot_dim: int, base: float, *, interleaved: bool) -> Tensor:
    """Rotate channel pairs as complex numbers: pair i turns by position * base**(-2i/rot)."""
    x = t.double()
    out = x.clone()
    for i in range(rot_dim // 2):
        angle = positions.double() * base ** (-2.0 * i / rot_dim)  # [s]
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + rot_dim // 2)
        z = torch.complex(x[..., a], x[..., b]) * torch.polar(
            torch.ones_like(angle), angle)[:, None, None]  # [s, b, n]
        out[..., a], out[..., b] = z.real, z.imag
    return out


def rope_table(seq: int, rot_dim: int, base: float, *, interleaved: bool) -> Tensor:
    inv_freq = base ** (-torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)  # [rot/2]
    freqs = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq)  # [s, rot/2]
    emb = freqs.repeat_interleave(2, -1) if interleaved else torch.cat((freqs, freqs), -1)
    return emb.float()[:, None, None, :]  # [s, 1, 1, rot]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rot_fraction", [1.0, 0.5])
def test_rope_matches_complex_rotation(device: str, interleaved: bool, rot_fraction: float) -> None:
    torch.manual_seed(0)
    seq, batch, heads, head_dim = 9, 2, 3, 32
    rot = int(head_dim * rot_fraction)
    # A strided view, as a fused QKV projection produces: every other head of a wider tensor.
    wide = torch.randn(seq, batch, 2 * heads, head_dim, device=device)
    t = wide[:, :, ::2]
    freqs = rope_table(seq + 4, rot, 10000.0, interleaved=interleaved).to(device)
    out = fused_apply_rotary_pos_emb(t, freqs, rotary_interleaved=interleaved)
    expected = naive_rope(t, torch.arange(seq, device=device), rot, 10000.0, interleaved=interleaved)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
    assert out.dtype == t.dtype and out.shape == t.shape


@pytest.mark.parametrize("device", DEVICES)
def test_rope_gradient_is_the_inverse_rotation(device: str) -> None:
    torch.manual_seed(1)
    t = torch.randn(7, 2, 4, 16, device=device, requires_grad=True)
    freqs = rope_table(7, 16, 500.0, interleaved=False).to(device)
    grad = torch.randn(7, 2, 4, 16, device=device)
    fused_apply_rotary_pos_emb(t, freqs).backward(grad)
    assert t.grad is not None
    # A rotation is orthogonal: the gradient is the output gradient rotated back.
    expected = naive_rope(grad, -torch.arange(7, device=device), 16, 500.0, interleaved=False)
    torch.testing.assert_close(t.grad.double(), expected, atol=1e-4, rtol=1e-4)


@needs_cuda
def test_rope_bf16_on_gpu_within_one_rounding() -> None:
    torch.manual_seed(2)
    t = torch.randn(64, 3, 8, 128, device="cuda").bfloat16()
    freqs = rope_table(64, 128, 10000.0, interleaved=False).cuda()
    out = fused_apply_rotary_pos_emb(t, freqs)
    expected = naive_rope(t.float(), torch.arange(64, device="cuda"), 128, 10000.0, interleaved=False)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_rope_pair_rotates_query_and_key_like_the_reference(device: str) -> None:
    """One cos/sin for a query and a key (grouped heads): each equals the complex rotation."""
    torch.manual_seed(9)
    seq, rot = 6, 8
    query = torch.randn(seq, 2, 4, 8, device=device)
    key = torch.randn(seq, 2, 2, 8, device=device)
    freqs = rope_table(seq + 3, rot, 10000.0, interleaved=False).to(device)
    got_q, got_k = fused_apply_rotary_pos_emb_pair(query, key, freqs)
    positions = torch.arange(seq)
    for got, t in ((got_q, query), (got_k, key)):
        expected = naive_rope(t.cpu(), positions, rot, 10000.0, interleaved=False)
        torch.testing.assert_close(got.cpu().double(), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="sequence length"):
        fused_apply_rotary_pos_emb_pair(query, key[:3], freqs)


def test_rope_rejects_bad_shapes() -> None:
    freqs = rope_table(4, 8, 10000.0, interleaved=False)
    with pytest.raises(ValueError, match=r"\[s, b, n, d\]"):
        fused_apply_rotary_pos_emb(torch.randn(4, 2, 8), freqs)
    with pytest.raises(ValueError, match="exceeds the rotary table"):
        fused_apply_rotary_pos_emb(torch.randn(5, 1, 1, 8), freqs)
    with pytest.raises(ValueError, match="even number"):
        fused_apply_rotary_pos_emb(torch.randn(4, 1, 1, 4), freqs)


# -- linear + cross-entropy -------------------------------------------------------------------


def reference_loss(hidden: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    logits = (hidden.double() @ weight.double().t())  # [N, v]
    return F.cross_entropy(logits, target, reduction="none")  # [N]


@pytest.mark.parametrize("chunk_size", [1, 5, 64, None])
def test_linear_cross_entropy_values_and_gradients(chunk_size: int | None) -> None:
    torch.manual_seed(3)
    tokens, hidden_size, vocab = 23, 16, 37
    hidden = torch.randn(tokens, hidden_size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, vocab, (tokens,))
    upstream = torch.rand(tokens, dtype=torch.float64)  # per-token weights, e.g. a loss mask
    upstream[::4] = 0.0

    loss = fused_linear_cross_entropy(hidden, weight, target, chunk_size=chunk_size)
    expected = reference_loss(hidden, weight, target)
    assert loss.dtype == torch.float32 and loss.shape == (tokens,)
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)

    grads = torch.autograd.grad(loss, (hidden, weight), upstream.float())
    expected_grads = torch.autograd.grad(expected, (hidden, weight), upstream)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_cross_entropy_mean_reduction_matches_reference(device: str) -> None:
    torch.manual_seed(4)
    dtype = torch.float64 if device == "cpu" else torch.float32
    hidden = torch.randn(2, 9, 16, dtype=dtype, device=device, requires_grad=True)
    weight = torch.randn(41, 16, dtype=dtype, device=device, requires_grad=True)
    target = torch.randint(0, 41, (2, 9), device=device)
    loss = fused_linear_cross_entropy(hidden, weight, target, reduction="mean")
    expected = reference_loss(hidden.reshape(-1, 16), weight, target.reshape(-1)).mean()
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(loss, (hidden, weight))
    for got, want in zip(grads, torch.autograd.grad(expected, (hidden, weight)), strict=True):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(hidden, weight, target, reduction="sum")  # type: ignore[arg-type]


@pytest.mark.parametrize("chunk_size", [1, 5, 64, None])
def test_linear_cross_entropy_mean_gradients_made_in_forward(chunk_size: int | None) -> None:
    """The mean path computes both gradients in forward, chunk by chunk; backward scales
    them by the incoming gradient (here 2.5, not 1), against F.cross_entropy in float64."""
    torch.manual_seed(6)
    tokens, hidden_size, vocab = 23, 16, 37
    hidden = torch.randn(tokens, hidden_size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, vocab, (tokens,))
    loss = fused_linear_cross_entropy(hidden, weight, target, chunk_size=chunk_size,
                                      reduction="mean")
    expected = F.cross_entropy(hidden @ weight.t(), target)  # mean over tokens
    torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=1e-6)
    upstream = torch.tensor(2.5, dtype=torch.float64)
    grads = torch.autograd.grad(loss, (hidden, weight), upstream.float())
    expected_grads = torch.autograd.grad(expected, (hidden, weight), upstream)
    for got, want in zip(grads, expected_grads, strict=True):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # Only one input needs a gradient; none (evaluation) computes the loss alone.
    frozen = weight.detach()
    (grad_hidden,) = torch.autograd.grad(
        fused_linear_cross_entropy(hidden, frozen, target, reduction="mean"), (hidden,))
    torch.testing.assert_close(grad_hidden, torch.autograd.grad(
        F.cross_entropy(hidden @ frozen.t(), target), (hidden,))[0], atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(fused_linear_cross_entropy(hidden, weight, target,
                                                              reduction="mean").double(),
                                   expected.detach(), atol=1e-6, rtol=1e-6)


def test_linear_cross_entropy_mean_bounds_memory_and_follows_autocast() -> None:
    torch.manual_seed(7)
    tokens, hidden_size, vocab, chunk = 64, 8, 300, 8
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    target = torch.randint(0, vocab, (tokens,))
    with LargestTensor() as mode:
        loss = fused_linear_cross_entropy(hidden, weight, target, chunk_size=chunk,
                                          reduction="mean")
        loss.backward()
    assert mode.largest <= max(chunk * vocab, vocab * hidden_size, tokens * hidden_size)
    # bf16 hidden states with float32 weights (autocast training): matmuls in bf16, the
    # weight gradient returned in the weight's dtype.
    low = hidden.detach().bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = fused_linear_cross_entropy(low, weight, target, chunk_size=chunk,
                                           reduction="mean")
    grad_low, grad_weight = torch.autograd.grad(mixed, (low, weight))
    assert grad_low.dtype == torch.bfloat16 and grad_weight.dtype == torch.float32
    reference = F.cross_entropy(low.double() @ weight.double().t(), target)
    torch.testing.assert_close(mixed.double(), reference.detach(), atol=3e-2, rtol=3e-2)
    expected_weight = torch.autograd.grad(reference, (weight,))[0]
    error = (grad_weight.double() - expected_weight).norm() / expected_weight.norm()
    assert error < 2e-2, float(error)


def test_linear_cross_entropy_keeps_leading_shape() -> None:
    hidden = torch.randn(3, 2, 8)
    weight = torch.randn(11, 8)
    target = torch.randint(0, 11, (3, 2))
    loss = fused_linear_cross_entropy(hidden, weight, target, chunk_size=4)
    expected = reference_loss(hidden.reshape(6, 8), weight, target.reshape(6)).view(3, 2)
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator produced."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, Tensor):
                self.largest = max(self.largest, value.numel())
        return out


def test_linear_cross_entropy_never_materializes_full_logits() -> None:
    torch.manual_seed(4)
    tokens, hidden_size, vocab, chunk = 64, 8, 300, 8
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    target = torch.randint(0, vocab, (tokens,))
    with LargestTensor() as mode:
        loss = fused_linear_cross_entropy(hidden, weight, target, chunk_size=chunk)
        loss.sum().backward()
    # O(chunk * vocab): the [chunk, v] logits or the [v, h] weight gradient, never [N, v].
    assert mode.largest <= max(chunk * vocab, vocab * hidden_size)
    assert mode.largest < tokens * vocab


def test_default_chunk_size_bounds_the_logits() -> None:
    assert default_chunk_size(10, 100, torch.device("cpu")) == 10
    chunk = default_chunk_size(1_000_000, 128256, torch.device("cpu"))
    assert 1 <= chunk and chunk * 128256 <= 1 << 24


def test_linear_cross_entropy_errors() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        fused_linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="target shape"):
        fused_linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"lie in \[0, 10\)"):
        fused_linear_cross_entropy(torch.randn(2, 8), torch.randn(10, 8), torch.tensor([0, 10]))
    with pytest.raises(TypeError, match="int64 or int32"):
        fused_linear_cross_entropy(torch.randn(2, 8), torch.randn(10, 8), torch.zeros(2))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_on_gpu(dtype: torch.dtype) -> None:
    torch.manual_seed(5)
    tokens, hidden_size, vocab = 1000, 256, 5003
    hidden = (torch.randn(tokens, hidden_size, device="cuda") * 0.5).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, device="cuda") * 0.05).to(dtype).requires_grad_(True)
    target = torch.randint(0, vocab, (tokens,), device="cuda")
    upstream = torch.rand(tokens, device="cuda")
    loss = fused_linear_cross_entropy(hidden, weight, target)
    expected = reference_loss(hidden, weight, target)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(loss.double(), expected, atol=tol, rtol=tol)
    grads = torch.autograd.grad(loss, (hidden, weight), upstream)
    expected_grads = torch.autograd.grad(expected, (hidden, weight), upstream.double())
    for got, want in zip(grads, expected_grads, strict=True):
        error = (got.double() - want).norm() / want.norm()
        assert error < (1e-4 if dtype == torch.float32 else 2e-2), float(error)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_mean_on_gpu(dtype: torch.dtype) -> None:
    """The mean path on CUDA (Triton softmax-and-gradient kernel when Triton is present),
    several chunks, against F.cross_entropy in float64."""
    torch.manual_seed(8)
    tokens, hidden_size, vocab = 1000, 256, 50003
    hidden = (torch.randn(tokens, hidden_size, device="cuda") * 0.5).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, device="cuda") * 0.05).to(dtype).requires_grad_(True)
    target = torch.randint(0, vocab, (tokens,), device="cuda")
    target[:3] = torch.tensor([0, vocab - 1, vocab // 2])  # both ends of the vocabulary
    loss = fused_linear_cross_entropy(hidden, weight, target, chunk_size=384, reduction="mean")
    expected = F.cross_entropy(hidden.double() @ weight.double().t(), target)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(loss.double(), expected, atol=tol, rtol=tol)
    grads = torch.autograd.grad(loss * 3.0, (hidden, weight))
    expected_grads = torch.autograd.grad(expected * 3.0, (hidden, weight))
    for got, want in zip(grads, expected_grads, strict=True):
        assert got.dtype == dtype
        error = (got.double() - want).norm() / want.norm()
        assert error < (1e-4 if dtype == torch.float32 else 2e-2), float(error)


# -- RMSNorm and SwiGLU -------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_formula(device: str, dtype: torch.dtype) -> None:
    torch.manual_seed(6)
    x = torch.randn(5, 3, 96, device=device).to(dtype).requires_grad_(True)
    weight = torch.randn(96, device=device).to(dtype).requires_grad_(True)
    out = fused_rms_norm(x, weight, 1e-6)
    x64, w64 = x.double(), weight.double()
    expected = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w64
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    grad = torch.randn_like(expected)
    got = torch.autograd.grad(out, (x, weight), grad.to(dtype))
    want = torch.autograd.grad(expected, (x, weight), grad)
    for g, w in zip(got, want, strict=True):
        assert (g.double() - w).norm() / w.norm() < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_formula(device: str, dtype: torch.dtype) -> None:
    torch.manual_seed(7)
    x = torch.randn(4, 3, 2 * 48, device=device).to(dtype).requires_grad_(True)
    out = fused_swiglu(x)
    gate, up = x.double()[..., :48], x.double()[..., 48:]
    expected = gate / (1.0 + torch.exp(-gate)) * up
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    grad = torch.randn_like(expected)
    (got,) = torch.autograd.grad(out, x, grad.to(dtype))
    (want,) = torch.autograd.grad(expected, x, grad)
    assert (got.double() - want).norm() / want.norm() < (1e-5 if dtype == torch.float32 else 2e-2)


def test_swiglu_rejects_odd_width() -> None:
    with pytest.raises(ValueError, match="even last dimension"):
        fused_swiglu(torch.randn(2, 7))


@needs_cuda
def test_liger_is_importable_on_gpu_machines_that_carry_it() -> None:
    # Informational: the GPU paths of RMSNorm/SwiGLU/cross-entropy need liger-kernel.
    if not liger_available():
        pytest.skip("liger-kernel not installed: fused RMSNorm/SwiGLU/CE fall back to PyTorch")
    assert math.isfinite(float(fused_rms_norm(torch.ones(2, 8, device="cuda"),
                                              torch.ones(8, device="cuda"), 1e-6).sum()))
