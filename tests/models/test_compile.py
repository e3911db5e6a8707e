"""`compile_layers`: compiled layers compute what the eager ones do (loss and every gradient),
share one graph across the stack, decode eagerly, and fall back with a warning."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from protoformer import TransformerConfig
from protoformer.backends.fused import FusedSpecProvider, fused_config
from protoformer.generation import greedy_generate
from protoformer.models import GPTModel, compile_layers
from protoformer.models.compile import compile_available
from protoformer.recipes import gpt_layer_spec
from protoformer.train.loop import TrainOptions, train
from protoformer.transformer.layer import TransformerLayer

VOCAB, SEQ = 97, 16


def _model(layers: int = 2, **overrides: object) -> GPTModel:
    config = TransformerConfig(
        num_layers=layers, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=96, normalization="RMSNorm", add_bias_linear=False,
        gated_linear_unit=True, activation_func=F.silu, hidden_dropout=0.0,
        attention_dropout=0.0, **overrides)  # type: ignore[arg-type]
    config = fused_config(config)  # Triton RoPE / fused loss switches: their CPU paths here
    torch.manual_seed(0)
    return GPTModel(config, gpt_layer_spec(FusedSpecProvider(), config), VOCAB, 2 * SEQ)


def _loss_and_grads(model: GPTModel, ids: torch.Tensor, labels: torch.Tensor
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels, loss_reduction="mean")
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (torch.randint(0, VOCAB, (2, SEQ), generator=generator),
            torch.randint(0, VOCAB, (2, SEQ), generator=generator))


def test_inductor_compiled_layers_match_the_eager_model() -> None:
    problem = compile_available(torch.device("cpu"))
    if problem is not None:
        pytest.skip(f"no working torch.compile (Inductor) on this CPU: {problem}")
    eager = _model()
    compiled = copy.deepcopy(eager)
    assert compile_layers(compiled) == 2
    ids, labels = _batch()
    for _ in range(2):  # the second call runs the cached graph
        want_loss, want_grads = _loss_and_grads(eager, ids, labels)
        got_loss, got_grads = _loss_and_grads(compiled, ids, labels)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
        assert len(got_grads) == len(want_grads) == len(list(eager.parameters()))
        for got, want in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_compiled_stack_shares_one_graph_recomputes_and_decodes_eagerly() -> None:
    from torch._dynamo.utils import counters

    eager = _model(layers=3, recompute_granularity="full")
    compiled = copy.deepcopy(eager)
    assert compile_layers(compiled, backend="aot_eager") == 3
    assert all(m.compile_options is not None and m.compile_options.backend == "aot_eager"
               for m in compiled.modules() if isinstance(m, TransformerLayer))
    ids, labels = _batch()
    counters.clear()
    want_loss, want_grads = _loss_and_grads(eager, ids, labels)
    got_loss, got_grads = _loss_and_grads(compiled, ids, labels)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # the layers did run through Dynamo
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    _loss_and_grads(compiled, ids, labels)
    # Three layers, two steps: the graphs of the first layer's first call serve them all.
    assert counters["stats"]["unique_graphs"] == graphs
    # Decoding with a KV cache takes the eager path: the same tokens as the eager model.
    eager.eval()
    compiled.eval()
    prompts = [[5, 6, 7, 8], [9, 10]]
    torch.testing.assert_close(greedy_generate(compiled, prompts, 6),
                               greedy_generate(eager, prompts, 6), rtol=0, atol=0)


def test_where_compilation_cannot_work_the_layers_stay_eager_with_one_warning() -> None:
    model = _model()
    reference = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="compile_layers: torch.compile does not work here"):
        assert compile_layers(model, backend="no_such_backend") == 0
    assert all(m.compile_options is None for m in model.modules()
               if isinstance(m, TransformerLayer))
    ids, labels = _batch()
    torch.testing.assert_close(_loss_and_grads(model, ids, labels)[0],
                               _loss_and_grads(reference, ids, labels)[0], rtol=0, atol=0)
    assert compile_layers(torch.nn.Linear(2, 2)) == 0  # no transformer layers: nothing to do


def test_train_option_compile_compiles_the_layers(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import protoformer.train.setup as setup

    calls: list[int] = []

    def traced_only(model: torch.nn.Module) -> int:  # tracing without Inductor: quick
        calls.append(compile_layers(model, backend="aot_eager"))
        return calls[-1]

    monkeypatch.setattr(setup, "compile_layers", traced_only)
    settings: dict[str, object] = {
        "preset": "tiny", "steps": 2, "batch_size": 4, "seq_len": 32, "lr": 3e-3,
        "warmup_steps": 1, "eval_every": 2, "eval_batches": 1, "save_every": 2,
        "log_every": 2, "seed": 0, "device": "cpu", "max_corpus_bytes": 50_000,
        "progress": False}
    eager = train(TrainOptions(out_dir=tmp_path / "eager", **settings))  # type: ignore[arg-type]
    assert calls == []
    compiled = train(TrainOptions(out_dir=tmp_path / "compiled", compile=True,  # type: ignore[arg-type]
                                  **settings))
    layers = [m for m in compiled.model.modules() if isinstance(m, TransformerLayer)]
    assert calls == [len(layers)] and all(m.compile_options is not None for m in layers)
    for got, want in ((compiled.train_losses, eager.train_losses),
                      (compiled.validation_losses, eager.validation_losses)):
        assert [step for step, _ in got] == [step for step, _ in want]
        assert [loss for _, loss in got] == pytest.approx([loss for _, loss in want], rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_fused_layers_on_gpu_are_as_close_to_float32_as_eager() -> None:
    """bf16 on CUDA: liger / Triton kernels in eager, Inductor's kernels compiled; both
    against the same model in float32."""
    if compile_available(torch.device("cuda")) is not None:
        pytest.skip("torch.compile does not work on this GPU machine")
    config = TransformerConfig(
        num_layers=2, hidden_size=256, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=512, normalization="RMSNorm", add_bias_linear=False,
        gated_linear_unit=True, activation_func=F.silu, hidden_dropout=0.0,
        attention_dropout=0.0, params_dtype=torch.bfloat16, bf16=True)
    config = fused_config(config)
    torch.manual_seed(0)
    with torch.device("cuda"):
        eager = GPTModel(config, gpt_layer_spec(FusedSpecProvider(), config), 1000, 256)
    reference = copy.deepcopy(eager).float()
    compiled = copy.deepcopy(eager)
    assert compile_layers(compiled) == 2
    ids = torch.randint(0, 1000, (2, 256), device="cuda")
    labels = torch.randint(0, 1000, (2, 256), device="cuda")
    want_loss, want_grads = _loss_and_grads(reference, ids, labels)
    errors: dict[str, list[float]] = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        loss, grads = _loss_and_grads(model, ids, labels)
        errors[name] = [float((loss.float() - want_loss).abs() / want_loss.abs())] + [
            float((g.float() - w).norm() / w.norm()) for g, w in zip(grads, want_grads, strict=True)]
    assert max(errors["compiled"]) < 0.05, errors["compiled"]
    for got, eager_error in zip(errors["compiled"], errors["eager"], strict=True):
        assert got <= 2 * eager_error + 1e-3, (errors["compiled"], errors["eager"])
