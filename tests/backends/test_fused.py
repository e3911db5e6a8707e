"""The fused backend: registry, builder conformance, CPU fallback wiring, and (on a GPU) fused
outputs and gradients against the local backend's within bf16 tolerance."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import protoformer.backends.fused as fused
from protoformer import TransformerConfig
from protoformer.backends import BackendSpecProvider, available_backends, get_backend
from protoformer.backends.fused import (
    FusedActivation,
    FusedLayerNorm,
    FusedRMSNorm,
    FusedSDPAttention,
    FusedSpecProvider,
    fused_config,
)
from protoformer.models import GPTModel
from protoformer.parallel.protocols import (
    ColumnParallelLinearBuilder,
    LinearBuilder,
    RowParallelLinearBuilder,
)
from protoformer.recipes import gpt_layer_spec
from protoformer.spec import SpecError, check_builder
from protoformer.transformer.attention import SelfAttentionSubmodules
from protoformer.transformer.core_attention import SDPAttention
from protoformer.transformer.enums import AttnMaskType
from protoformer.transformer.interfaces import CoreAttentionBuilder
from protoformer.transformer.mlp import Activation, ActivationBuilder
from protoformer.transformer.norm import LayerNorm, LayerNormBuilder, RMSNorm

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
VOCAB = 97


def llama_config(**overrides: object) -> TransformerConfig:
    fields: dict[str, object] = {
        "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
        "ffn_hidden_size": 96, "normalization": "RMSNorm", "gated_linear_unit": True,
        "activation_func": F.silu, "add_bias_linear": False, "attention_dropout": 0.0,
        "hidden_dropout": 0.0, "init_method_std": 0.05,
    }
    fields.update(overrides)
    return TransformerConfig(**fields)  # type: ignore[arg-type]


def build_pair(config: TransformerConfig, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
               seed: int = 0, fused_model_config: TransformerConfig | None = None,
               ) -> tuple[GPTModel, GPTModel]:
    """A local-backend model and a fused-backend model with the same weights."""
    torch.manual_seed(seed)
    local = GPTModel(config, gpt_layer_spec(get_backend("local"), config), VOCAB, 64)
    fused_cfg = fused_model_config if fused_model_config is not None else config
    fast = GPTModel(fused_cfg, gpt_layer_spec(get_backend("fused"), fused_cfg), VOCAB, 64)
    fast.load_state_dict(local.state_dict())
    return local.to(device=device, dtype=dtype), fast.to(device=device, dtype=dtype)


# ---------------------------------------------------------------- registry and slots


def test_get_backend_fused() -> None:
    backend = get_backend("fused")
    assert isinstance(backend, FusedSpecProvider)
    assert backend.name == "fused"
    assert "fused" in available_backends()
    assert "FusedSpecProvider" in repr(backend)


def test_fused_builders_conform_to_their_protocols() -> None:
    backend: BackendSpecProvider = FusedSpecProvider(attention_kernels=("cudnn", "flash"))
    check_builder(backend.column_parallel_linear(), ColumnParallelLinearBuilder)
    check_builder(backend.row_parallel_linear(), RowParallelLinearBuilder)
    check_builder(backend.linear(), LinearBuilder)
    for rms_norm in (False, True):
        for for_qk in (False, True):
            check_builder(backend.layer_norm(rms_norm=rms_norm, for_qk=for_qk), LayerNormBuilder)
    check_builder(backend.core_attention(), CoreAttentionBuilder)
    check_builder(FusedSDPAttention, CoreAttentionBuilder)
    check_builder(backend.activation(), ActivationBuilder)
    assert get_backend("fused").layer_norm(rms_norm=True) is FusedRMSNorm
    assert get_backend("fused").layer_norm() is FusedLayerNorm
    assert get_backend("fused").core_attention() is FusedSDPAttention
    assert get_backend("fused").activation() is FusedActivation
    # Each fused builder is its local counterpart with a faster forward.
    for fast, local in ((FusedRMSNorm, RMSNorm), (FusedLayerNorm, LayerNorm),
                        (FusedSDPAttention, SDPAttention), (FusedActivation, Activation)):
        assert issubclass(fast, local)


def test_miswired_fused_builder_is_rejected_at_construction() -> None:
    backend = FusedSpecProvider()
    with pytest.raises(SpecError, match="core_attention"):
        SelfAttentionSubmodules(
            linear_qkv=backend.column_parallel_linear(),
            core_attention=FusedRMSNorm,  # type: ignore[arg-type]
            linear_proj=backend.row_parallel_linear(),
        )


def test_attention_kernel_names_are_validated() -> None:
    with pytest.raises(ValueError, match="unknown attention kernel"):
        FusedSpecProvider(attention_kernels=("flash", "triton"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty sequence"):
        FusedSpecProvider(attention_kernels=())
    with pytest.raises(ValueError, match="non-empty sequence"):
        FusedSpecProvider(attention_kernels="flash")  # type: ignore[arg-type]
    config = llama_config()
    core = FusedSDPAttention(config, 1, AttnMaskType.causal, kernels=("efficient", "flash", "flash"))
    assert core.kernels == ("efficient", "flash")
    built = FusedSpecProvider(attention_kernels=("cudnn",)).core_attention()
    assert isinstance(built, functools.partial)


def test_fused_config_switches_on_the_model_level_fusions() -> None:
    config = fused_config(llama_config())
    assert config.apply_rope_fusion and config.cross_entropy_loss_fusion
    assert not llama_config().apply_rope_fusion
    with pytest.raises(ValueError, match="apply_rope_fusion"):
        llama_config(apply_rope_fusion="yes")
    with pytest.raises(ValueError, match="cross_entropy_loss_fusion"):
        llama_config(cross_entropy_loss_fusion=1)


def test_kernel_report_lists_every_fused_path() -> None:
    report = FusedSpecProvider().kernel_report()
    assert set(report) == {"cuda", "triton_rope", "liger_rms_norm", "liger_swiglu",
                           "liger_fused_linear_cross_entropy", "fused_sdpa",
                           "compiled_expert_activation", "torchao_fp8"}
    if not torch.cuda.is_available():
        assert not any(report.values())


# ---------------------------------------------------------------- CPU: falls back to local


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_fused_model_on_cpu_equals_local_model(normalization: str) -> None:
    config = llama_config(normalization=normalization, qk_layernorm=True)
    local, fast = build_pair(config, fused_model_config=fused_config(config))
    ids = torch.randint(0, VOCAB, (2, 11))
    labels = torch.randint(0, VOCAB, (2, 11))
    torch.testing.assert_close(fast(ids), local(ids), atol=1e-5, rtol=1e-5)
    loss_local, loss_fast = local(ids, labels), fast(ids, labels)
    torch.testing.assert_close(loss_fast, loss_local, atol=1e-5, rtol=1e-5)
    weights = torch.rand(2, 11)
    (loss_local * weights).sum().backward()
    (loss_fast * weights).sum().backward()
    fast_params = dict(fast.named_parameters())
    for name, param in local.named_parameters():
        assert param.grad is not None and fast_params[name].grad is not None, name
        torch.testing.assert_close(fast_params[name].grad, param.grad, atol=1e-5, rtol=1e-4)


def test_fused_layers_on_cpu_equal_local_layers() -> None:
    config = llama_config()
    x = torch.randn(5, 2, 64)
    torch.testing.assert_close(FusedRMSNorm(64, config=config)(x), RMSNorm(64, config=config)(x))
    torch.testing.assert_close(FusedLayerNorm(64, config=config)(x), LayerNorm(64, config=config)(x))
    gated = torch.randn(5, 2, 96)
    torch.testing.assert_close(FusedActivation(config, gated=True)(gated),
                               Activation(config, gated=True)(gated))
    q, k, v = torch.randn(5, 2, 4, 16), torch.randn(5, 2, 2, 16), torch.randn(5, 2, 2, 16)
    fast = FusedSDPAttention(config, 1, AttnMaskType.causal)(q, k, v, None)
    torch.testing.assert_close(fast, SDPAttention(config, 1, AttnMaskType.causal)(q, k, v, None))


# ---------------------------------------------------------------- GPU: fused vs local


def relative_error(got: Tensor, want: Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-12))


@needs_cuda
@pytest.mark.parametrize("kernels", [("flash", "cudnn", "efficient"), ("cudnn", "flash"),
                                     ("efficient",)])
@pytest.mark.parametrize("groups", [4, 2, 1])
def test_fused_core_attention_matches_local_on_gpu(kernels: tuple[fused.AttentionKernel, ...],
                                                   groups: int) -> None:
    torch.manual_seed(0)
    config = llama_config()
    sq, batch, heads, hn = 128, 2, 4, 64
    q = torch.randn(sq, batch, heads, hn, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(sq, batch, groups, hn, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(sq, batch, groups, hn, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    fast = FusedSDPAttention(config, 1, AttnMaskType.causal, kernels=kernels)
    reference = SDPAttention(config, 1, AttnMaskType.causal)
    out = fast(q, k, v, None)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        expected = reference(q.float(), k.float(), v.float(), None)
    assert relative_error(out, expected) < 1e-2
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad.float())
    for g, w in zip(got, want, strict=True):
        assert relative_error(g, w) < 2e-2


@needs_cuda
def test_fused_core_attention_with_padding_mask_on_gpu() -> None:
    torch.manual_seed(1)
    config = llama_config()
    q = torch.randn(32, 2, 4, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(32, 2, 2, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(32, 2, 2, 64, device="cuda", dtype=torch.bfloat16)
    mask = torch.zeros(2, 1, 1, 32, dtype=torch.bool, device="cuda")
    mask[1, ..., 20:] = True
    out = FusedSDPAttention(config, 1, AttnMaskType.padding_causal)(q, k, v, mask)
    expected = SDPAttention(config, 1, AttnMaskType.padding_causal)(q.float(), k.float(), v.float(), mask)
    assert relative_error(out, expected) < 1e-2


@needs_cuda
@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_fused_norms_and_swiglu_match_local_on_gpu(normalization: str) -> None:
    torch.manual_seed(2)
    config = llama_config(params_dtype=torch.bfloat16)
    kind = (FusedRMSNorm, RMSNorm) if normalization == "RMSNorm" else (FusedLayerNorm, LayerNorm)
    fast, local = kind[0](256, config=config).cuda(), kind[1](256, config=config).cuda()
    with torch.no_grad():
        fast.weight.normal_()
        local.weight.copy_(fast.weight)
    x = torch.randn(4, 333, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out, expected = fast(x), local(x)
    assert out.dtype == torch.bfloat16 and relative_error(out, expected) < 1e-2
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, fast.weight), grad)
    want = torch.autograd.grad(expected, (x, local.weight), grad)
    for g, w in zip(got, want, strict=True):
        assert relative_error(g, w) < 2e-2
    gated = torch.randn(4, 333, 2 * 192, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    act_out = FusedActivation(config, gated=True)(gated)
    act_ref = Activation(config, gated=True)(gated)
    assert relative_error(act_out, act_ref) < 1e-2
    g_act = torch.randn_like(act_out)
    (got_act,) = torch.autograd.grad(act_out, gated, g_act)
    (want_act,) = torch.autograd.grad(act_ref, gated, g_act)
    assert relative_error(got_act, want_act) < 2e-2


@needs_cuda
def test_fused_model_matches_local_model_on_gpu_in_bf16() -> None:
    config = llama_config(num_layers=3, hidden_size=256, num_attention_heads=8,
                          num_query_groups=2, ffn_hidden_size=512, params_dtype=torch.bfloat16,
                          bf16=True)
    local, fast = build_pair(config, device="cuda", dtype=torch.bfloat16,
                             fused_model_config=fused_config(config))
    ids = torch.randint(0, VOCAB, (2, 48), device="cuda")
    labels = torch.randint(0, VOCAB, (2, 48), device="cuda")
    assert relative_error(fast(ids), local(ids)) < 2e-2
    loss_local, loss_fast = local(ids, labels), fast(ids, labels)
    assert loss_fast.dtype == torch.float32
    assert relative_error(loss_fast, loss_local) < 1e-2
    loss_local.mean().backward()
    loss_fast.mean().backward()
    fast_params = dict(fast.named_parameters())
    for name, param in local.named_parameters():
        fast_grad = fast_params[name].grad
        assert param.grad is not None and fast_grad is not None, name
        assert relative_error(fast_grad, param.grad) < 5e-2, name
