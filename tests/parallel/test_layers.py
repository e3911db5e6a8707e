"""Tensor-parallel linears and the vocabulary-parallel embedding on one process (tp = 1).

References are written here: einsum for forward values, and plain autograd through
`torch.nn.functional` on cloned leaves for gradients (compared bit for bit where the layer
runs the same kernels).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protoformer import TransformerConfig
from protoformer.parallel import (
    ColumnParallelLinear,
    ColumnParallelLinearBuilder,
    Linear,
    LinearBuilder,
    RowParallelLinear,
    RowParallelLinearBuilder,
    VocabParallelEmbedding,
)
from protoformer.parallel.parameters import ParallelMetadata, parallel_metadata
from protoformer.spec import SpecError, check_builder

IN, OUT = 6, 10


def make_config(**overrides: object) -> TransformerConfig:
    return TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, **overrides)  # type: ignore[arg-type]


normal_init = partial(nn.init.normal_, std=0.5)

def column(config: TransformerConfig, *, bias: bool = True, skip_bias_add: bool = False,
           gather_output: bool = False) -> ColumnParallelLinear:
    return ColumnParallelLinear(IN, OUT, config=config, init_method=normal_init, bias=bias,
                                gather_output=gather_output, skip_bias_add=skip_bias_add)


def row(config: TransformerConfig, *, bias: bool = True, skip_bias_add: bool = False,
        input_is_parallel: bool = True) -> RowParallelLinear:
    return RowParallelLinear(IN, OUT, config=config, init_method=normal_init, bias=bias,
                             input_is_parallel=input_is_parallel, skip_bias_add=skip_bias_add)


def replicated(config: TransformerConfig, *, bias: bool = True,
               skip_bias_add: bool = False) -> Linear:
    return Linear(IN, OUT, config=config, init_method=normal_init, bias=bias,
                  skip_bias_add=skip_bias_add)


FACTORIES = {"column": column, "row": row, "linear": replicated}


def randomize_bias(layer: nn.Module) -> Tensor:
    bias = layer.bias
    assert isinstance(bias, Tensor)
    with torch.no_grad():
        bias.normal_()
    return bias


def naive_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    out = torch.einsum("sbi,oi->sbo", x.double(), weight.double())
    return out if bias is None else out + bias.double()


# -- forward: (output, bias) ------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(FACTORIES))
@pytest.mark.parametrize("skip_bias_add", [False, True])
def test_forward_returns_output_and_bias(kind: str, skip_bias_add: bool) -> None:
    torch.manual_seed(0)
    layer = FACTORIES[kind](make_config(), skip_bias_add=skip_bias_add)
    bias = randomize_bias(layer)
    x = torch.randn(5, 3, IN)
    output, returned_bias = layer(x)
    assert output.shape == (5, 3, OUT)
    if skip_bias_add:
        assert returned_bias is bias
        torch.testing.assert_close(output, naive_linear(x, layer.weight, None).float())
    else:
        assert returned_bias is None
        torch.testing.assert_close(output, naive_linear(x, layer.weight, bias).float())


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_without_bias_there_is_no_bias_parameter(kind: str) -> None:
    layer = FACTORIES[kind](make_config(), bias=False, skip_bias_add=True)
    assert layer.bias is None
    assert [name for name, _ in layer.named_parameters()] == ["weight"]
    x = torch.randn(2, 1, IN)
    output, returned_bias = layer(x)
    assert returned_bias is None
    torch.testing.assert_close(output, naive_linear(x, layer.weight, None).float())


@pytest.mark.parametrize("gather_output", [False, True])
def test_column_gather_output_is_the_full_output_on_one_rank(gather_output: bool) -> None:
    torch.manual_seed(1)
    layer = column(make_config(), gather_output=gather_output)
    bias = randomize_bias(layer)
    assert layer.weight is not None and layer.weight.shape == (OUT, IN)
    x = torch.randn(4, 2, IN)
    output, _ = layer(x)
    torch.testing.assert_close(output, naive_linear(x, layer.weight, bias).float())
    output, _ = layer(x, runtime_gather_output=not gather_output)
    assert output.shape == (4, 2, OUT)


@pytest.mark.parametrize("input_is_parallel", [False, True])
def test_row_input_is_parallel_is_the_whole_input_on_one_rank(input_is_parallel: bool) -> None:
    torch.manual_seed(2)
    layer = row(make_config(), input_is_parallel=input_is_parallel)
    bias = randomize_bias(layer)
    assert layer.weight.shape == (OUT, IN)
    x = torch.randn(4, 2, IN)
    output, _ = layer(x)
    torch.testing.assert_close(output, naive_linear(x, layer.weight, bias).float())


def test_column_with_a_tied_weight_uses_the_given_weight() -> None:
    layer = ColumnParallelLinear(IN, OUT, config=make_config(), init_method=normal_init,
                                 bias=False, gather_output=False, skip_bias_add=False,
                                 skip_weight_param_allocation=True)
    assert layer.weight is None and list(layer.parameters()) == []
    x = torch.randn(3, 2, IN)
    with pytest.raises(ValueError, match="skip_weight_param_allocation"):
        layer(x)
    shared = torch.randn(OUT, IN, requires_grad=True)
    output, _ = layer(x, weight=shared)
    torch.testing.assert_close(output, naive_linear(x, shared, None).float())
    output.sum().backward()
    assert shared.grad is not None
    with pytest.raises(ValueError, match="weight= has shape"):
        layer(x, weight=torch.randn(IN, OUT))


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_wrong_input_width_is_a_clear_error(kind: str) -> None:
    layer = FACTORIES[kind](make_config())
    with pytest.raises(ValueError, match=f"last dim is input_size.*={IN}"):
        layer(torch.randn(2, 2, IN + 1))


def test_row_sequence_parallel_requires_parallel_input() -> None:
    with pytest.raises(ValueError, match="input_is_parallel=True"):
        row(make_config(sequence_parallel=True), input_is_parallel=False)


def test_sizes_must_be_positive_ints() -> None:
    with pytest.raises(ValueError, match="output_size=0"):
        ColumnParallelLinear(IN, 0, config=make_config(), init_method=normal_init, bias=True,
                             gather_output=False, skip_bias_add=False)


# -- initialisation --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_init_method_initialises_the_full_weight_and_bias_is_zero(kind: str) -> None:
    seen: list[tuple[int, ...]] = []

    def init(weight: Tensor) -> None:
        seen.append(tuple(weight.shape))
        nn.init.normal_(weight, std=0.02)

    layer_class = {"column": ColumnParallelLinear, "row": RowParallelLinear, "linear": Linear}[kind]
    kind_keyword: dict[str, object] = {"column": {"gather_output": False},
                                       "row": {"input_is_parallel": True}, "linear": {}}[kind]
    torch.manual_seed(3)
    built = layer_class(IN, OUT, config=make_config(), init_method=init, bias=True,
                        skip_bias_add=False, **kind_keyword)
    assert seen == [(OUT, IN)]
    torch.manual_seed(3)
    expected = torch.empty(OUT, IN)
    nn.init.normal_(expected, std=0.02)
    assert torch.equal(built.weight, expected)
    assert torch.equal(built.bias, torch.zeros(OUT))


def test_perform_initialization_false_skips_init_method() -> None:
    calls: list[Tensor] = []
    ColumnParallelLinear(IN, OUT, config=make_config(perform_initialization=False),
                         init_method=calls.append, bias=True, gather_output=False,
                         skip_bias_add=False)
    assert calls == []


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_parameters_use_params_dtype(dtype: torch.dtype) -> None:
    config = make_config(params_dtype=dtype)
    for factory in FACTORIES.values():
        layer = factory(config)
        assert {p.dtype for p in layer.parameters()} == {dtype}
    embedding = VocabParallelEmbedding(12, 4, init_method=normal_init, config=config)
    assert embedding.weight.dtype == dtype


def test_layers_can_be_built_on_the_meta_device() -> None:
    calls: list[Tensor] = []
    with torch.device("meta"):
        layer = ColumnParallelLinear(IN, OUT, config=make_config(), init_method=calls.append,
                                     bias=True, gather_output=False, skip_bias_add=False)
        embedding = VocabParallelEmbedding(12, 4, init_method=calls.append, config=make_config())
    assert calls == []
    assert layer.weight is not None and layer.weight.is_meta and embedding.weight.is_meta


def test_parameters_say_how_they_are_split() -> None:
    config = make_config()
    col, rw, lin = column(config), row(config), replicated(config)
    assert col.weight is not None and rw.bias is not None
    assert parallel_metadata(col.weight) == ParallelMetadata(partition_dim=0)
    assert parallel_metadata(rw.weight) == ParallelMetadata(partition_dim=1)
    assert not parallel_metadata(rw.bias).tensor_model_parallel
    assert not parallel_metadata(lin.weight).tensor_model_parallel
    assert not parallel_metadata(lin.weight).sequence_parallel
    sp = replicated(make_config(sequence_parallel=True))
    assert parallel_metadata(sp.weight) == ParallelMetadata(sequence_parallel=True)


# -- deferred weight gradients ---------------------------------------------------------------


def reference_step(kind: str, layer: nn.Module, x: Tensor, grad: Tensor,
                   weight: Tensor, bias: Tensor) -> Tensor:
    """One forward/backward of plain autograd on the reference leaves; returns x's gradient."""
    x = x.detach().requires_grad_()
    if kind == "row":  # the bias is added after the (here trivial) reduction
        output = F.linear(x, weight) + bias
    else:
        output = F.linear(x, weight, bias)
    output.backward(grad)
    assert x.grad is not None
    return x.grad


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_backward_dw_equals_autograd_exactly(kind: str) -> None:
    torch.manual_seed(4)
    layer = FACTORIES[kind](make_config(delay_wgrad_compute=True))
    randomize_bias(layer)
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    inputs = [torch.randn(5, 3, IN) for _ in range(3)]
    grads = [torch.randn(5, 3, OUT) for _ in range(3)]

    # Two backward passes, then backward_dw: gradients accumulate as autograd's do.
    for x, grad in zip(inputs[:2], grads[:2], strict=True):
        x_layer = x.clone().requires_grad_()
        output, _ = layer(x_layer)
        output.backward(grad)
        assert layer.weight.grad is None  # deferred
        assert torch.equal(x_layer.grad, reference_step(kind, layer, x, grad, weight, bias))
    layer.backward_dw()
    assert torch.equal(layer.weight.grad, weight.grad)
    assert torch.equal(layer.bias.grad, bias.grad)

    # A third pass accumulates onto the existing gradients.
    x_layer = inputs[2].clone().requires_grad_()
    layer(x_layer)[0].backward(grads[2])
    reference_step(kind, layer, inputs[2], grads[2], weight, bias)
    layer.backward_dw()
    assert torch.equal(layer.weight.grad, weight.grad)
    assert torch.equal(layer.bias.grad, bias.grad)
    layer.backward_dw()  # nothing pending: no change
    assert torch.equal(layer.weight.grad, weight.grad)


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_backward_dw_with_skip_bias_add_leaves_bias_to_autograd(kind: str) -> None:
    torch.manual_seed(5)
    layer = FACTORIES[kind](make_config(delay_wgrad_compute=True), skip_bias_add=True)
    weight = layer.weight.detach().clone().requires_grad_()
    x, grad = torch.randn(4, 2, IN), torch.randn(4, 2, OUT)
    output, bias = layer(x)
    (output + bias).backward(grad)
    assert layer.weight.grad is None and layer.bias.grad is not None
    layer.backward_dw()
    F.linear(x, weight).backward(grad)
    assert torch.equal(layer.weight.grad, weight.grad)
    assert torch.equal(layer.bias.grad, grad.sum(dim=(0, 1)))


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_backward_dw_is_a_no_op_without_delay(kind: str) -> None:
    torch.manual_seed(6)
    layer = FACTORIES[kind](make_config())
    layer(torch.randn(2, 2, IN))[0].sum().backward()
    before = layer.weight.grad.clone()
    layer.backward_dw()
    assert torch.equal(layer.weight.grad, before)


def test_backward_dw_with_a_tied_weight_accumulates_into_it() -> None:
    layer = ColumnParallelLinear(IN, OUT, config=make_config(delay_wgrad_compute=True),
                                 init_method=normal_init, bias=False, gather_output=False,
                                 skip_bias_add=False, skip_weight_param_allocation=True)
    shared = torch.randn(OUT, IN, requires_grad=True)
    reference = shared.detach().clone().requires_grad_()
    x, grad = torch.randn(3, 2, IN), torch.randn(3, 2, OUT)
    layer(x, weight=shared)[0].backward(grad)
    assert shared.grad is None
    layer.backward_dw()
    F.linear(x, reference).backward(grad)
    assert torch.equal(shared.grad, reference.grad)


# -- the layers fit their Builder protocols ---------------------------------------------------


def test_each_linear_satisfies_its_builder_and_no_other() -> None:
    builders: dict[type, type] = {
        ColumnParallelLinear: ColumnParallelLinearBuilder,
        RowParallelLinear: RowParallelLinearBuilder,
        Linear: LinearBuilder,
    }
    for layer, protocol in builders.items():
        check_builder(layer, protocol)
        for other, other_protocol in builders.items():
            if other is not layer:
                with pytest.raises(SpecError):
                    check_builder(other, protocol)
                with pytest.raises(SpecError):
                    check_builder(layer, other_protocol)


# -- embedding -------------------------------------------------------------------------------


def test_embedding_equals_functional_embedding_with_gradient() -> None:
    torch.manual_seed(7)
    embedding = VocabParallelEmbedding(12, 4, init_method=normal_init, config=make_config())
    weight = embedding.weight.detach().clone().requires_grad_()
    ids = torch.randint(0, 12, (3, 5))
    output = embedding(ids)
    assert output.shape == (3, 5, 4)
    expected = F.embedding(ids, weight)
    assert torch.equal(output, expected)
    grad = torch.randn(3, 5, 4)
    output.backward(grad)
    expected.backward(grad)
    assert torch.equal(embedding.weight.grad, weight.grad)


def test_embedding_init_uses_init_method_on_the_full_table() -> None:
    torch.manual_seed(8)
    embedding = VocabParallelEmbedding(12, 4, init_method=normal_init, config=make_config())
    torch.manual_seed(8)
    assert torch.equal(embedding.weight, nn.init.normal_(torch.empty(12, 4), std=0.5))


@pytest.mark.parametrize("bad_id", [-1, 12])
def test_embedding_rejects_ids_outside_the_vocabulary(bad_id: int) -> None:
    embedding = VocabParallelEmbedding(12, 4, init_method=normal_init, config=make_config())
    ids = torch.tensor([[0, 3, bad_id]])
    with pytest.raises(ValueError, match=r"must lie in \[0, 12\)"):
        embedding(ids)


def test_embedding_rejects_floating_ids() -> None:
    embedding = VocabParallelEmbedding(12, 4, init_method=normal_init, config=make_config())
    with pytest.raises(TypeError, match="int64 or int32"):
        embedding(torch.zeros(1, 2))
