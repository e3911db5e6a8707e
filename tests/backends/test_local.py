"""The local backend: registry lookup, builder conformance, and runtime rejection of miswirings."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import protoformer.backends as backends
from protoformer import TransformerConfig
from protoformer.backends import (
    BackendSpecProvider,
    LocalSpecProvider,
    get_backend,
    register_backend,
)
from protoformer.parallel import ColumnParallelLinear, RowParallelLinear
from protoformer.parallel.protocols import (
    ColumnParallelLinearBuilder,
    LinearBuilder,
    RowParallelLinearBuilder,
)
from protoformer.spec import SpecError, check_builder
from protoformer.transformer.attention import SelfAttention, SelfAttentionSubmodules
from protoformer.transformer.core_attention import SDPAttention
from protoformer.transformer.interfaces import CoreAttentionBuilder
from protoformer.transformer.mlp import Activation, ActivationBuilder
from protoformer.transformer.norm import LayerNorm, LayerNormBuilder, RMSNorm


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "_registry", dict(backends._registry))


def test_get_backend_local() -> None:
    backend = get_backend("local")
    assert isinstance(backend, LocalSpecProvider)
    assert backend.name == "local"
    assert "local" in backends.available_backends()


def test_unknown_backend_lists_known_names() -> None:
    # "fused" exists once protoformer.backends.fused is imported, so ask for a name that never does.
    with pytest.raises(ValueError, match=r"unknown backend 'no-such-backend'.*known backends: .*'local'"):
        get_backend("no-such-backend")


def test_register_backend(isolated_registry: None) -> None:
    class Custom(LocalSpecProvider):
        name = "custom"

    register_backend("custom", Custom)
    register_backend("custom", Custom)  # the same factory again is harmless
    assert isinstance(get_backend("custom"), Custom)
    with pytest.raises(ValueError, match="already registered"):
        register_backend("custom", LocalSpecProvider)
    register_backend("custom", LocalSpecProvider, replace=True)
    assert type(get_backend("custom")) is LocalSpecProvider
    with pytest.raises(TypeError, match="not callable"):
        register_backend("broken", "LocalSpecProvider")  # type: ignore[arg-type]


def test_builders_conform_to_their_protocols() -> None:
    backend: BackendSpecProvider = get_backend("local")
    check_builder(backend.column_parallel_linear(), ColumnParallelLinearBuilder)
    check_builder(backend.row_parallel_linear(), RowParallelLinearBuilder)
    check_builder(backend.linear(), LinearBuilder)
    for rms_norm in (False, True):
        for for_qk in (False, True):
            check_builder(backend.layer_norm(rms_norm=rms_norm, for_qk=for_qk), LayerNormBuilder)
    check_builder(backend.core_attention(), CoreAttentionBuilder)
    check_builder(backend.activation(), ActivationBuilder)
    assert backend.layer_norm() is LayerNorm
    assert backend.layer_norm(rms_norm=True) is RMSNorm
    assert backend.core_attention() is SDPAttention
    assert backend.activation() is Activation


def test_backend_submodules_build_a_working_layer() -> None:
    backend = get_backend("local")
    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=4,
                               num_query_groups=2, qk_layernorm=True, attention_dropout=0.0)
    submodules = SelfAttentionSubmodules(
        linear_qkv=backend.column_parallel_linear(),
        core_attention=backend.core_attention(),
        linear_proj=backend.row_parallel_linear(),
        q_layernorm=backend.layer_norm(rms_norm=True, for_qk=True),
        k_layernorm=backend.layer_norm(rms_norm=True, for_qk=True),
    )
    layer = SelfAttention(config, submodules, layer_number=1)
    out, bias = layer(torch.randn(3, 2, 16))
    assert out.shape == (3, 2, 16)
    assert bias is not None and bias.shape == (16,)


# ---------------------------------------------------------------- runtime miswirings


class ProjReturningTensor(nn.Module):
    """A row-parallel-looking linear whose forward returns a bare Tensor (no bias slot)."""

    def __init__(self, input_size: int, output_size: int, /, *, config: TransformerConfig,
                 init_method: object, bias: bool, input_is_parallel: bool, skip_bias_add: bool,
                 is_expert: bool, tp_comm_buffer_name: str | None, tp_group: object) -> None:
        super().__init__()
        self.linear = nn.Linear(input_size, output_size, bias=bias)

    def forward(self, hidden_states: Tensor, /) -> Tensor:
        return self.linear(hidden_states)

    def backward_dw(self) -> None:
        return None


class ProjWithoutBackwardDw(nn.Module):
    """A row-parallel-looking linear that lacks `backward_dw`."""

    def __init__(self, input_size: int, output_size: int, /, *, config: TransformerConfig,
                 init_method: object, bias: bool, input_is_parallel: bool, skip_bias_add: bool,
                 is_expert: bool, tp_comm_buffer_name: str | None, tp_group: object) -> None:
        super().__init__()
        self.linear = nn.Linear(input_size, output_size, bias=bias)

    def forward(self, hidden_states: Tensor, /) -> tuple[Tensor, Tensor | None]:
        return self.linear(hidden_states), None


def _submodules(**slots: object) -> SelfAttentionSubmodules:
    backend = get_backend("local")
    fields: dict[str, object] = {
        "linear_qkv": backend.column_parallel_linear(),
        "core_attention": backend.core_attention(),
        "linear_proj": backend.row_parallel_linear(),
    }
    fields.update(slots)
    return SelfAttentionSubmodules(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("slot", "builder", "builder_name", "problem"),
    [
        ("linear_proj", get_backend("local").column_parallel_linear(), "ColumnParallelLinear",
         "input_is_parallel"),
        ("linear_proj", ColumnParallelLinear, "ColumnParallelLinear", "input_is_parallel"),
        ("linear_qkv", RowParallelLinear, "RowParallelLinear", "gather_output"),
        ("linear_proj", ProjReturningTensor, "ProjReturningTensor", "returns Tensor"),
        ("linear_proj", ProjWithoutBackwardDw, "ProjWithoutBackwardDw", "backward_dw"),
    ],
    ids=["backend-column-as-proj", "column-as-proj", "row-as-qkv", "bare-tensor", "no-backward-dw"],
)
def test_miswired_slot_raises_spec_error(slot: str, builder: object, builder_name: str,
                                         problem: str) -> None:
    with pytest.raises(SpecError) as raised:
        _submodules(**{slot: builder})
    message = str(raised.value)
    assert f"SelfAttentionSubmodules.{slot}" in message
    assert builder_name in message
    assert problem in message
