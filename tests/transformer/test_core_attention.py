"""DotProductAttention and SDPAttention against a naive per-head, per-row reference."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from protoformer import TransformerConfig
from protoformer.spec import check_builder
from protoformer.transformer.core_attention import DotProductAttention, SDPAttention
from protoformer.transformer.enums import AttnMaskType
from protoformer.transformer.interfaces import CoreAttentionBuilder
from protoformer.transformer.masks import (
    causal_mask,
    combine_masks,
    padding_mask_from_attention_mask,
    padding_mask_from_lengths,
)

IMPLEMENTATIONS = [DotProductAttention, SDPAttention]
Impl = type[DotProductAttention] | type[SDPAttention]


def make_config(**overrides: object) -> TransformerConfig:
    fields: dict[str, object] = {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 4,
                                 "attention_dropout": 0.0}
    fields.update(overrides)
    return TransformerConfig(**fields)  # type: ignore[arg-type]


def build(cls: Impl, mask_type: AttnMaskType = AttnMaskType.no_mask, *,
          config: TransformerConfig | None = None, softmax_scale: float | None = None,
          attention_dropout: float | None = None) -> DotProductAttention | SDPAttention:
    return cls(config or make_config(), layer_number=1, attn_mask_type=mask_type,
               attention_type="self", attention_dropout=attention_dropout,
               softmax_scale=softmax_scale, pg=None)


# ---------------------------------------------------------------- independent reference


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              blocked: torch.Tensor | None = None, additive: torch.Tensor | None = None,
              causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Softmax attention one (batch, head, query row) at a time, in float64.

    `blocked` (bool) and `additive` (float) broadcast to [b, np, sq, sk]. A row with no
    visible key gives a zero vector (the documented behaviour of both implementations).
    """
    sq, b, heads, hn = q.shape
    sk, _, groups, hv = v.shape
    scale = 1.0 / math.sqrt(hn) if scale is None else scale
    shape = (b, heads, sq, sk)
    blocked_full = torch.zeros(shape, dtype=torch.bool) if blocked is None else blocked.expand(shape)
    additive_full = torch.zeros(shape, dtype=torch.float64) if additive is None else additive.double().expand(shape)
    out = torch.zeros(sq, b, heads, hv, dtype=torch.float64)
    for bi in range(b):
        for h in range(heads):
            g = h // (heads // groups)
            for i in range(sq):
                scores = torch.stack([
                    (q[i, bi, h].double() @ k[j, bi, g].double()) * scale + additive_full[bi, h, i, j]
                    for j in range(sk)])
                visible = [j for j in range(sk)
                           if not blocked_full[bi, h, i, j]
                           and not (causal and j > i + sk - sq)
                           and scores[j] != -math.inf]
                if not visible:
                    continue
                weights = torch.softmax(scores[visible], dim=0)
                out[i, bi, h] = sum(w * v[j, bi, g].double() for w, j in zip(weights, visible, strict=True))
    return out.reshape(sq, b, heads * hv)


@dataclass
class Case:
    heads: int
    groups: int
    hn: int = 8
    hv: int = 8
    sq: int = 5
    sk: int = 5
    batch: int = 2

    def inputs(self, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(self.sq, self.batch, self.heads, self.hn, generator=gen)
        k = torch.randn(self.sk, self.batch, self.groups, self.hn, generator=gen)
        v = torch.randn(self.sk, self.batch, self.groups, self.hv, generator=gen)
        return q, k, v


HEAD_LAYOUTS = {
    "mha": Case(heads=4, groups=4),
    "gqa": Case(heads=4, groups=2),
    "mqa": Case(heads=4, groups=1),
    "hv_differs": Case(heads=4, groups=2, hn=8, hv=6),
}


def run_both(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
             mask_type: AttnMaskType, **call: object) -> torch.Tensor:
    """Run both implementations, assert they agree to 1e-5, return the reference one's output."""
    outs = [build(cls, mask_type)(q, k, v, mask, **call) for cls in IMPLEMENTATIONS]  # type: ignore[arg-type]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    return outs[0]


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
def test_no_mask_matches_reference(layout: str) -> None:
    case = HEAD_LAYOUTS[layout]
    q, k, v = case.inputs()
    out = run_both(q, k, v, None, AttnMaskType.no_mask)
    assert out.shape == (case.sq, case.batch, case.heads * case.hv)
    torch.testing.assert_close(out.double(), reference(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
@pytest.mark.parametrize(("sq", "sk"), [(5, 5), (3, 7), (1, 6)])
def test_causal_is_bottom_right_aligned(layout: str, sq: int, sk: int) -> None:
    case = HEAD_LAYOUTS[layout]
    case = Case(case.heads, case.groups, case.hn, case.hv, sq=sq, sk=sk)
    q, k, v = case.inputs(1)
    out = run_both(q, k, v, None, AttnMaskType.causal)
    torch.testing.assert_close(out.double(), reference(q, k, v, causal=True), atol=1e-5, rtol=1e-5)


def test_causal_also_applies_a_given_padding_mask() -> None:
    # A padding mask passed with the (default) causal type is applied, not silently dropped.
    q, k, v = Case(4, 2).inputs(2)
    padding = torch.zeros(2, 1, 1, 5, dtype=torch.bool)
    padding[1, ..., 3:] = True  # the second sequence's last two keys are padding
    out = run_both(q, k, v, padding, AttnMaskType.causal)
    want = reference(q, k, v, blocked=padding, causal=True)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out.double(), reference(q, k, v, causal=True), atol=1e-3)


@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
def test_padding_mask(layout: str) -> None:
    case = HEAD_LAYOUTS[layout]
    q, k, v = case.inputs(3)
    lengths = torch.tensor([5, 3])
    mask = padding_mask_from_lengths(lengths, 5)  # [b, 1, 1, sk]
    blocked = torch.arange(5)[None, None, None, :] >= lengths[:, None, None, None]
    assert torch.equal(mask, blocked)
    out = run_both(q, k, v, mask, AttnMaskType.padding)
    torch.testing.assert_close(out.double(), reference(q, k, v, blocked=blocked), atol=1e-5, rtol=1e-5)


def test_padding_causal_combines_both() -> None:
    case = Case(heads=4, groups=2, sq=3, sk=6)
    q, k, v = case.inputs(4)
    hf_mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # left padding, HF style
    mask = padding_mask_from_attention_mask(hf_mask)
    out = run_both(q, k, v, mask, AttnMaskType.padding_causal)
    want = reference(q, k, v, blocked=(hf_mask == 0)[:, None, None, :], causal=True)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
def test_arbitrary_boolean_mask(layout: str) -> None:
    case = HEAD_LAYOUTS[layout]
    q, k, v = case.inputs(5)
    blocked = torch.rand(case.batch, case.heads, case.sq, case.sk,
                         generator=torch.Generator().manual_seed(0)) < 0.4
    blocked[..., 0] = False  # keep one key per row; fully blocked rows are tested separately
    out = run_both(q, k, v, blocked, AttnMaskType.arbitrary)
    torch.testing.assert_close(out.double(), reference(q, k, v, blocked=blocked), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
def test_additive_float_mask(layout: str) -> None:
    case = HEAD_LAYOUTS[layout]
    q, k, v = case.inputs(6)
    additive = torch.randn(case.batch, 1, case.sq, case.sk)
    additive[0, 0, 1, 2:] = float("-inf")
    out = run_both(q, k, v, additive, AttnMaskType.arbitrary)
    torch.testing.assert_close(out.double(), reference(q, k, v, additive=additive), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask_type", [AttnMaskType.no_mask, AttnMaskType.causal,
                                       AttnMaskType.padding_causal])
def test_attention_bias_is_added_to_scores(mask_type: AttnMaskType) -> None:
    case = Case(heads=4, groups=1, sq=4, sk=6)
    q, k, v = case.inputs(7)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625]).view(1, 4, 1, 1)
    distance = torch.arange(6).view(1, 1, 1, 6) - torch.arange(4).view(1, 1, 4, 1)
    bias = slopes * distance  # ALiBi-like, [1, np, sq, sk]
    padding = padding_mask_from_lengths(torch.tensor([6, 4]))
    out = run_both(q, k, v, padding, mask_type, attention_bias=bias)
    causal = mask_type is not AttnMaskType.no_mask
    blocked = padding if mask_type is not AttnMaskType.no_mask else None  # causal applies it too
    want = reference(q, k, v, blocked=blocked, additive=bias, causal=causal)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", IMPLEMENTATIONS)
def test_softmax_scale_argument_then_config_then_default(cls: Impl) -> None:
    q, k, v = Case(4, 2, hn=8, hv=6).inputs(8)
    custom = build(cls, softmax_scale=0.7)(q, k, v, None)
    torch.testing.assert_close(custom.double(), reference(q, k, v, scale=0.7), atol=1e-5, rtol=1e-5)
    from_config = build(cls, config=make_config(softmax_scale=0.3))(q, k, v, None)
    torch.testing.assert_close(from_config.double(), reference(q, k, v, scale=0.3), atol=1e-5, rtol=1e-5)
    # The default uses the *query* head size (8), not the value head size (6).
    default = build(cls)(q, k, v, None)
    torch.testing.assert_close(default.double(), reference(q, k, v, scale=8**-0.5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", IMPLEMENTATIONS)
def test_per_call_mask_type_overrides_constructor(cls: Impl) -> None:
    q, k, v = Case(4, 4).inputs(9)
    attention = build(cls, AttnMaskType.causal)
    out = attention(q, k, v, None, attn_mask_type=AttnMaskType.no_mask)
    torch.testing.assert_close(out.double(), reference(q, k, v), atol=1e-5, rtol=1e-5)
    blocked = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    blocked[..., 3] = True
    ignored = attention(q, k, v, blocked, attn_mask_type=AttnMaskType.no_mask)
    torch.testing.assert_close(ignored, out)


@pytest.mark.parametrize("cls", IMPLEMENTATIONS)
def test_fully_blocked_rows_give_zeros_and_finite_gradients(cls: Impl) -> None:
    case = Case(heads=4, groups=2, sq=4, sk=5)
    q, k, v = (t.requires_grad_() for t in case.inputs(10))
    blocked = torch.zeros(2, 1, 4, 5, dtype=torch.bool)
    blocked[0, :, 2, :] = True  # batch 0, query 2 sees nothing
    additive = torch.zeros(2, 4, 4, 5)
    additive[1, 3, 0, :] = float("-inf")  # batch 1, head 3, query 0 sees nothing
    mask = combine_masks(blocked, additive)
    assert mask is not None
    out = build(cls, AttnMaskType.arbitrary)(q, k, v, mask)
    assert torch.isfinite(out).all()
    per_head = out.view(4, 2, 4, 8)  # [sq, b, np, hv]
    assert torch.equal(per_head[2, 0], torch.zeros_like(per_head[2, 0]))
    assert torch.equal(per_head[0, 1, 3], torch.zeros_like(per_head[0, 1, 3]))
    torch.testing.assert_close(out.double(), reference(q.detach(), k.detach(), v.detach(),
                                                       blocked=blocked, additive=additive),
                               atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    for tensor in (q, k, v):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()


@pytest.mark.parametrize("layout", ["gqa", "mqa", "hv_differs"])
@pytest.mark.parametrize("mask_kind", ["per_row", "per_head", "two_dims", "additive"])
def test_one_query_with_grouped_heads_and_a_mask(layout: str, mask_kind: str) -> None:
    """Decoding (sq == 1) with a mask: SDPAttention folds a group's query heads into query
    rows (no per-head copy of the keys); every mask layout still applies per head and row."""
    base = HEAD_LAYOUTS[layout]
    case = Case(base.heads, base.groups, hn=base.hn, hv=base.hv, sq=1, sk=7, batch=3)
    q, k, v = case.inputs(21)
    if mask_kind == "per_row":  # [b, 1, 1, sk]: each row's own cache length; row 2 sees nothing
        mask = torch.arange(7)[None, None, None, :] >= torch.tensor([7, 3, 0])[:, None, None, None]
    elif mask_kind == "per_head":  # [b, np, 1, sk]: head 1 of row 0 sees nothing
        mask = torch.rand(3, 4, 1, 7, generator=torch.Generator().manual_seed(3)) > 0.6
        mask[:, :, :, 0] = False
        mask[0, 1] = True
    elif mask_kind == "two_dims":  # [sq, sk]
        mask = torch.tensor([[False, True, False, False, True, False, False]])
    else:  # additive [b, 1, 1, sk] with -inf
        mask = torch.zeros(3, 1, 1, 7)
        mask[1, :, :, 4:] = float("-inf")
        mask[2] = float("-inf")
    out = run_both(q, k, v, mask, AttnMaskType.arbitrary)
    if mask.dtype == torch.bool:
        expected = reference(q, k, v, blocked=mask)
    else:
        expected = reference(q, k, v, additive=mask)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_causal_with_more_queries_than_keys_blocks_the_first_rows() -> None:
    case = Case(heads=2, groups=2, sq=4, sk=2)
    q, k, v = case.inputs(11)
    out = run_both(q, k, v, None, AttnMaskType.causal)
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))
    torch.testing.assert_close(out.double(), reference(q, k, v, causal=True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", IMPLEMENTATIONS)
def test_low_precision_keeps_dtype(cls: Impl) -> None:
    q, k, v = Case(4, 2).inputs(12)
    out = build(cls, AttnMaskType.causal)(q.bfloat16(), k.bfloat16(), v.bfloat16(), None)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference(q, k, v, causal=True), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("cls", IMPLEMENTATIONS)
def test_dropout_only_in_training(cls: Impl) -> None:
    q, k, v = Case(4, 2, sq=6, sk=6).inputs(13)
    attention = build(cls, AttnMaskType.causal, attention_dropout=0.5)
    attention.eval()
    evaluated = attention(q, k, v, None)
    torch.testing.assert_close(evaluated.double(), reference(q, k, v, causal=True), atol=1e-5, rtol=1e-5)
    attention.train()
    torch.manual_seed(0)
    trained = attention(q, k, v, None)
    assert not torch.allclose(trained, evaluated)
    # The config's rate is used when the argument is None.
    from_config = build(cls, config=make_config(attention_dropout=0.5))
    assert from_config.attention_dropout == 0.5
    no_dropout = build(cls, AttnMaskType.causal)  # config rate 0.0
    no_dropout.train()
    torch.testing.assert_close(no_dropout(q, k, v, None), evaluated)


# ---------------------------------------------------------------- masks helpers


def test_causal_mask_helper() -> None:
    assert torch.equal(causal_mask(3, 3)[0, 0], torch.ones(3, 3, dtype=torch.bool).triu(1))
    decode = causal_mask(2, 4)[0, 0]
    assert decode.tolist() == [[False, False, False, True], [False, False, False, False]]


def test_combine_masks() -> None:
    a = torch.tensor([[True, False, False]])
    b = torch.tensor([[False, False, True]])
    combined_bool = combine_masks(a, None, b)
    assert combined_bool is not None and combined_bool.tolist() == [[True, False, True]]
    additive = torch.tensor([[1.0, 2.0, 3.0]])
    combined = combine_masks(a, additive)
    assert combined is not None and combined.tolist() == [[float("-inf"), 2.0, 3.0]]
    assert combine_masks(None, None) is None


# ---------------------------------------------------------------- contract and errors


@pytest.mark.parametrize("cls", IMPLEMENTATIONS)
def test_satisfies_core_attention_builder(cls: Impl) -> None:
    check_builder(cls, CoreAttentionBuilder)
    builder: CoreAttentionBuilder = cls
    built = builder(make_config(), layer_number=2, attn_mask_type=AttnMaskType.causal,
                    attention_type="self", attention_dropout=None, softmax_scale=None, pg=None)
    assert isinstance(built, cls)


@pytest.mark.parametrize("cls", IMPLEMENTATIONS)
def test_bad_shapes_and_masks_are_clear_errors(cls: Impl) -> None:
    attention = build(cls, AttnMaskType.padding)
    q, k, v = Case(4, 2).inputs()
    with pytest.raises(ValueError, match="divisible"):
        attention(q, torch.randn(5, 2, 3, 8), torch.randn(5, 2, 3, 8), None)
    with pytest.raises(ValueError, match="batch"):
        attention(q, k[:, :1], v[:, :1], None)
    with pytest.raises(ValueError, match="key and value"):
        attention(q, k, v[:4], None)
    with pytest.raises(ValueError, match=r"shape \(2, 1, 1, 4\).*\[b, np, sq, sk\] = \[2, 4, 5, 5\]"):
        attention(q, k, v, torch.zeros(2, 1, 1, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"torch\.bool"):
        attention(q, k, v, torch.zeros(2, 1, 1, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match="floating"):
        attention(q, k, v, None, attention_bias=torch.zeros(1, 1, 5, 5, dtype=torch.bool))


# ---------------------------------------------------------------- GPU kernels


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
def test_sdpa_kernels_match_plain_math_on_gpu(dtype: torch.dtype, layout: str) -> None:
    """The fused CUDA kernels (flash / memory-efficient / cuDNN) agree with the plain math."""
    base = HEAD_LAYOUTS[layout]
    case = Case(base.heads, base.groups, hn=64, hv=64 if base.hv == base.hn else 32,
                sq=128, sk=128, batch=2)
    q, k, v = (t.cuda().to(dtype) for t in case.inputs(14))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    lengths = torch.tensor([128, 77], device="cuda")
    padding = padding_mask_from_lengths(lengths)
    blocked_rows = torch.zeros(2, 1, 128, 128, dtype=torch.bool, device="cuda")
    blocked_rows[1, :, 5, :] = True
    for mask_type, mask in [(AttnMaskType.causal, None), (AttnMaskType.padding, padding),
                            (AttnMaskType.padding_causal, padding),
                            (AttnMaskType.arbitrary, blocked_rows)]:
        plain = build(DotProductAttention, mask_type).cuda()(q, k, v, mask)
        fused = build(SDPAttention, mask_type).cuda()(q, k, v, mask)
        assert torch.isfinite(fused).all()
        torch.testing.assert_close(fused.float(), plain.float(), atol=tol, rtol=tol)
    # Decoding: one and several new queries against a longer cache.
    for sq in (1, 4):
        dq = q[:sq]
        plain = build(DotProductAttention, AttnMaskType.causal).cuda()(dq, k, v, None)
        fused = build(SDPAttention, AttnMaskType.causal).cuda()(dq, k, v, None)
        torch.testing.assert_close(fused.float(), plain.float(), atol=tol, rtol=tol)
    # Static decoding: one query per row, each row's cache length as a mask (heads folded).
    per_row = torch.arange(128, device="cuda")[None, None, None, :] \
        >= torch.tensor([128, 40], device="cuda")[:, None, None, None]  # [b, 1, 1, sk]
    plain = build(DotProductAttention, AttnMaskType.arbitrary).cuda()(q[:1], k, v, per_row)
    fused = build(SDPAttention, AttnMaskType.arbitrary).cuda()(q[:1], k, v, per_row)
    torch.testing.assert_close(fused.float(), plain.float(), atol=tol, rtol=tol)
