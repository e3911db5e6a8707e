"""Sizes read from a Hugging Face config are bounded before anything is allocated.

`hidden_size: 1000000000` used to try to allocate a terabyte (a traceback), also through a
checkpoint's stored `hf_config` in `generate`; `num_hidden_layers: 1000000` spun for minutes;
`num_attention_heads: 0` was a ZeroDivisionError; a 10^5-deep config.json a RecursionError.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from protoformer.cli import main
from protoformer.interop import HFConversionError, from_hf, model_from_hf_config, parse_hf_config
from protoformer.memory import ModelTooLargeError

LLAMA: dict[str, Any] = {
    "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 112,
    "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5}
DEEPSEEK: dict[str, Any] = {
    "model_type": "deepseek_v3", "vocab_size": 256, "hidden_size": 64,
    "intermediate_size": 112, "num_hidden_layers": 2, "num_attention_heads": 4,
    "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12,
    "n_routed_experts": 4, "first_k_dense_replace": 2, "max_position_embeddings": 256}


@pytest.mark.parametrize(("base", "key", "value"), [
    (LLAMA, "hidden_size", 10**9),
    (LLAMA, "vocab_size", 10**12),
    (LLAMA, "num_hidden_layers", 10**6),
    (LLAMA, "num_attention_heads", 0),
    (LLAMA, "num_key_value_heads", 0),
    (LLAMA, "intermediate_size", 10**15),
    (LLAMA, "max_position_embeddings", 10**12),
    (LLAMA, "head_dim", -1),
    (DEEPSEEK, "kv_lora_rank", 10**9),
    (DEEPSEEK, "num_attention_heads", 0),
    (DEEPSEEK, "qk_rope_head_dim", 0),
])
def test_an_absurd_size_is_one_error_naming_the_field(base: dict[str, Any], key: str,
                                                      value: int) -> None:
    start = time.monotonic()
    with pytest.raises(HFConversionError) as info:
        model_from_hf_config({**base, key: value}, device="cpu")
    message = str(info.value)
    assert f"{key}={value}" in message and "\n" not in message, message
    assert time.monotonic() - start < 5


def test_sizes_within_bounds_that_do_not_fit_in_memory_are_refused_before_allocating(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import protoformer.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 30)  # 1 GiB free
    big = {**LLAMA, "hidden_size": 16384, "intermediate_size": 65536, "num_hidden_layers": 100,
           "num_attention_heads": 128}
    info = parse_hf_config(big)
    assert info.config.hidden_size == 16384
    # Closed form: per layer q, k, v, o (128 heads of 128) and three MLP linears; embedding
    # and output layer (untied).
    per_layer = 4 * 16384 * 128 * 128 + 3 * 16384 * 65536
    parameters = 100 * per_layer + 2 * 256 * 16384
    assert f"{parameters / 1e9:.1f} B" == "429.5 B"
    with pytest.raises(ModelTooLargeError, match=r"needs about 429\.5 B parameters, 1\.6 TiB, "
                                                 r"but cpu has 1\.0 GiB free"):
        model_from_hf_config(big, device="cpu")


def test_a_deep_config_json_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(HFConversionError, match=r"config\.json: nested too deeply") as info:
        from_hf(tmp_path)
    assert "\n" not in str(info.value)


def test_a_deep_safetensors_index_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(HFConversionError, match=r"index\.json: nested too deeply"):
        from_hf(tmp_path)


def test_a_huge_value_is_quoted_by_a_short_prefix(tmp_path: Path) -> None:
    with pytest.raises(HFConversionError) as info:
        parse_hf_config({**LLAMA, "hidden_size": "9" * 1_000_000})
    assert len(str(info.value)) < 500


def test_generate_refuses_a_checkpoint_whose_stored_hf_config_is_absurd(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    step = tmp_path / "checkpoints" / "step_000001"
    step.mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step_000001\n")
    state = {"format": 1, "step": 1, "hf_config": {**LLAMA, "hidden_size": 10**9},
             "model": {"vocab_size": 256}}
    (step / "state.json").write_text(json.dumps(state))
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "a", "--device",
                 "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("protoformer: error: ") and err.count("\n") == 1, err
    assert "hidden_size=1000000000" in err
