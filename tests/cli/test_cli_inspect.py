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


# ------------------------------------------------------------------ encoder-decoder presets


def test_t5_small_report_counts_and_flops_match_closed_forms(capsys: pytest.CaptureFixture[str]) -> None:
    from protoformer.cli.inspect import inspect_t5_preset

    report = inspect_t5_preset("t5-small", seq_len=512)
    assert all(p.is_meta for p in report.model.parameters())
    # t5-small: 6 + 6 layers, d_model 512, 8 heads of 64, ReLU MLP 2048, vocabulary 32128,
    # 32 relative-position buckets per head in each stack, head tied to the embedding.
    vocab, hidden, inner, ffn, layers, heads = 32128, 512, 512, 2048, 6, 8
    attention = 4 * hidden * inner
    encoder = layers * (attention + 2 * hidden * ffn + 2 * hidden) + hidden
    decoder = layers * (2 * attention + 2 * hidden * ffn + 3 * hidden) + hidden
    assert report.total_params == vocab * hidden + 2 * 32 * heads + encoder + decoder == 60_506_624
    scores = 6 * layers * 512 * heads * (64 + 64)  # q k^T and p v against 512 positions
    assert report.flops_per_source_token == 6 * layers * (attention + 2 * hidden * ffn) + scores
    assert report.flops_per_token == (6 * (layers * (2 * attention + 2 * hidden * ffn)
                                           + hidden * vocab) + 2 * scores)
    assert main(["inspect", "t5-small"]) == 0
    out = capsys.readouterr().out
    assert "decoder.cross_attention.submodules.linear_kv" in out and "60,506,624" in out
    assert "per source token" in out and "per target token" in out


@pytest.mark.parametrize("name", ["t5-small", "t5-base", "t5-v1_1-xl", "mt5-small"])
def test_t5_presets_have_the_parameter_count_of_the_transformers_model(name: str) -> None:
    transformers = pytest.importorskip("transformers")
    from protoformer.cli.inspect import inspect_t5_preset
    from protoformer.recipes import get_t5_preset

    preset = get_t5_preset(name)
    config, encoder = preset.configs()
    hf_config = transformers.T5Config(
        vocab_size=preset.vocab_size, d_model=config.hidden_size, d_kv=config.head_dim,
        d_ff=config.ffn_hidden_size, num_layers=encoder.num_layers,
        num_decoder_layers=config.num_layers, num_heads=config.num_attention_heads,
        feed_forward_proj="gated-gelu" if config.gated_linear_unit else "relu")
    with torch.device("meta"):
        hf = transformers.T5ForConditionalGeneration(hf_config)
    unique = {id(p): p.numel() for p in hf.parameters()}
    untied_head = 0 if preset.tie_embeddings else preset.vocab_size * config.hidden_size
    assert inspect_t5_preset(name).total_params == sum(unique.values()) + untied_head


def test_spec_overrides_are_refused_for_t5_presets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "t5-small", "--set", "mlp=null"]) == 1
    assert "encoder-decoder preset" in capsys.readouterr().err
