"""`estimate_layout_memory` ("will it fit") against a closed form for a tiny GPT.

Parameters, gradients and AdamW state per GPU are exact counts written by hand from the
layer layout (`TransformerLayer` with biases: LayerNorm weight + bias, fused QKV and fc1
split by rows, proj and fc2 split by columns with replicated biases; vocabulary-parallel
embedding and output layer), not from the estimator's walk over the model."""

from __future__ import annotations

import pytest
import torch

from protoformer import TransformerConfig
from protoformer.backends import get_backend
from protoformer.memory import ParallelLayout, activation_bytes_per_layer, estimate_layout_memory
from protoformer.models import GPTModel
from protoformer.recipes import gpt_layer_spec

H, F, V, LAYERS = 16, 32, 64, 4


def tiny() -> tuple[GPTModel, TransformerConfig]:
    config = TransformerConfig(num_layers=LAYERS, hidden_size=H, num_attention_heads=4,
                               ffn_hidden_size=F)
    with torch.device("meta"):
        model = GPTModel(config, gpt_layer_spec(get_backend("local"), config), V, 32)
    return model, config


def layer_params(tp: int) -> int:
    replicated = 2 * H + H + 2 * H + H  # input norm (w, b), proj bias, pre-MLP norm, fc2 bias
    split = 3 * H * H + 3 * H + H * H + F * H + F + H * F  # qkv (w, b), proj, fc1 (w, b), fc2
    return replicated + split // tp


@pytest.mark.parametrize(("tp", "pp", "dp"), [(1, 1, 1), (2, 2, 2), (2, 4, 1)])
def test_parameters_gradients_and_optimizer_state_per_gpu(tp: int, pp: int, dp: int) -> None:
    model, config = tiny()
    assert sum(p.numel() for p in model.parameters()) == \
        LAYERS * layer_params(1) + 2 * V * H + 2 * H  # the hand count covers every parameter
    layout = ParallelLayout(tp=tp, pp=pp, dp=dp, fsdp=dp > 1, micro_batch_size=2, seq_len=8,
                            num_microbatches=pp)
    memory = estimate_layout_memory(model, config, V, layout)
    per_stage = LAYERS // pp * layer_params(tp)
    first = per_stage + V * H // tp + (2 * H + V * H // tp if pp == 1 else 0)
    last = per_stage + 2 * H + V * H // tp
    expected = first if memory.stage == 0 else last
    assert memory.stage in (0, pp - 1)
    shard = -(-expected // dp)
    assert memory.parameters == shard
    assert memory.parameter_bytes == memory.gradient_bytes == 4 * shard  # float32
    assert memory.optimizer_bytes == 8 * shard
    assert (memory.gathered_bytes > 0) == (dp > 1)


def test_tied_embeddings_put_a_copy_of_the_embedding_on_the_last_stage() -> None:
    config = TransformerConfig(num_layers=LAYERS, hidden_size=H, num_attention_heads=4,
                               ffn_hidden_size=F)
    with torch.device("meta"):
        model = GPTModel(config, gpt_layer_spec(get_backend("local"), config), V, 32,
                         share_embeddings_and_output_weights=True)
    one = estimate_layout_memory(model, config, V, ParallelLayout(micro_batch_size=2, seq_len=8))
    assert one.parameters == LAYERS * layer_params(1) + V * H + 2 * H  # the embedding once
    # One micro-batch in flight on each stage: the last (which adds the logits) is the larger.
    layout = ParallelLayout(pp=2, micro_batch_size=2, seq_len=8, num_microbatches=1)
    memory = estimate_layout_memory(model, config, V, layout)
    # Both ends hold the embedding; the last one also the final norm (w, b).
    assert (memory.stage, memory.parameters) == (1, LAYERS // 2 * layer_params(1) + V * H + 2 * H)


def test_activations_shrink_with_recompute_and_sequence_parallelism() -> None:
    _, config = tiny()
    base = ParallelLayout(tp=2, micro_batch_size=2, seq_len=8)
    none = activation_bytes_per_layer(config, base)
    # Full recompute: the layer input only, float32 [s, b, h].
    full = activation_bytes_per_layer(config, ParallelLayout(
        tp=2, micro_batch_size=2, seq_len=8, recompute="full"))
    assert full == 2 * 8 * H * 4 < none
    assert activation_bytes_per_layer(config, ParallelLayout(
        tp=2, micro_batch_size=2, seq_len=8, sequence_parallel=True)) < none
    with pytest.raises(ValueError, match="must divide"):
        model, _ = tiny()
        estimate_layout_memory(model, config, V, ParallelLayout(pp=3))


def test_inspect_prints_the_memory_per_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    from protoformer.cli import main

    assert main(["inspect", "tiny", "--tp", "2", "--pp", "2", "--fsdp", "2",
                 "--micro-batch-size", "1", "--seq", "64"]) == 0
    out = capsys.readouterr().out
    assert "memory per GPU, training: tp=2 x pp=2 x FSDP over 2" in out
    for row in ("parameters", "gradients", "optimizer state", "activations", "total"):
        assert f"  {row}" in out
    assert main(["inspect", "tiny", "--pp", "3"]) == 1  # 4 layers: one line, no traceback
    assert "must divide" in capsys.readouterr().err
