"""`protoformer inspect`: the spec tree, parameter counts and FLOPs, with nothing allocated."""

from __future__ import annotations

import pytest
import torch

from protoformer.cli import main
from protoformer.cli.inspect import inspect_preset


def _llama3_70b_parameters() -> int:
    # Closed form from the published Llama 3.1 70B shapes.
    vocab, hidden, layers, heads, kv_heads, head_dim, ffn = 128256, 8192, 80, 64, 8, 128, 28672
    attention = hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden
    mlp = 3 * hidden * ffn
    norms = 2 * hidden
    return layers * (attention + mlp + norms) + 2 * vocab * hidden + hidden


def test_llama3_70b_is_built_on_meta_and_allocates_nothing() -> None:
    report = inspect_preset("llama3-70b")
    tensors = [*report.model.parameters(), *report.model.buffers()]
    assert tensors and all(t.is_meta for t in tensors)
    assert report.total_params == _llama3_70b_parameters() == 70_553_706_496


def test_inspect_prints_slots_parameters_and_flops(capsys: pytest.CaptureFixture[str]) -> None:
    allocated_before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    assert main(["inspect", "llama3-70b"]) == 0
    out = capsys.readouterr().out
    assert "70,553,706,496" in out and "total" in out
    assert "self_attention.submodules.linear_qkv" in out
    assert "ColumnParallelLinear" in out and "RowParallelLinear" in out
    assert "mlp.submodules.linear_fc2" in out
    assert "training FLOPs per token at sequence length 4,096" in out
    for name in ("embedding", "decoder", "output_layer"):
        assert f"\n  {name} " in out
    if torch.cuda.is_available():
        assert torch.cuda.memory_allocated() == allocated_before


def test_inspect_shows_partial_keywords_and_empty_slots(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "tiny", "--seq-len", "256"]) == 0
    out = capsys.readouterr().out
    assert "self_attention" in out and "SelfAttention(" in out  # partial(SelfAttention, ...)
    assert "None" in out  # optional slots left empty (q/k norms, cross-attention)
    assert "at sequence length 256" in out


def test_every_preset_can_be_inspected() -> None:
    from protoformer.recipes import list_presets

    for name in list_presets():
        report = inspect_preset(name)
        assert report.total_params > 0 and report.flops_per_token > 0
        assert all(p.is_meta for p in report.model.parameters())
