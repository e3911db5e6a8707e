"""`generate --hf` and `train --init-from-hf` with a tiny random-init Hugging Face Llama.

The checkpoint directory is written by transformers' `save_pretrained` and holds a byte-level
BPE tokenizer.json trained here with the `tokenizers` library, so everything stays offline.
Generated text is compared with greedy decoding by the transformers model itself.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None
    or importlib.util.find_spec("tokenizers") is None,
    reason="needs Hugging Face transformers and tokenizers")

from protoformer.cli import main  # noqa: E402
from protoformer.cli.generate import load_model  # noqa: E402
from protoformer.interop import to_hf  # noqa: E402

TEXTS = ["def greet(name):\n    return 'hello ' + name\n", "hello world, hello there",
         "class Point:\n    x: int\n    y: int\n"]
PROMPT = "def hello"
MAX_POSITIONS = 64


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(TEXTS * 10, trainer=trainer)
    return tokenizer


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    """(directory, transformers model, tokenizer): a 2-layer Llama with a 300-token vocabulary."""
    import transformers

    tokenizer = _tokenizer()
    vocab = tokenizer.get_vocab_size()
    assert vocab >= 256  # the byte-level trainer needs every byte to be a token id
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.token_to_id("<s>"), eos_token_id=tokenizer.token_to_id("</s>"))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    directory = tmp_path_factory.mktemp("hf-llama")
    model.save_pretrained(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory, model, tokenizer


def _greedy_reference(model: Any, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding by the transformers model, recomputing the whole sequence each step."""
    sequence = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([sequence])).logits  # [1, len, v]
            sequence.append(int(logits[0, -1].argmax()))
    return sequence[len(ids):]


def _set_eos(directory: Path, eos: int) -> None:
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}))


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("protoformer: error: ") and err.count("\n") == 1, err
    return err


def test_generate_hf_streams_the_greedy_text_and_stops_after_eos(
        hf_checkpoint: tuple[Path, Any, Any], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    source, model, tokenizer = hf_checkpoint
    directory = tmp_path / "hf"
    shutil.copytree(source, directory)
    prompt_ids = tokenizer.encode(PROMPT).ids
    free = _greedy_reference(model, prompt_ids, 8)
    argv = ["generate", "--hf", str(directory), "--prompt", PROMPT, "--max-new-tokens", "8",
            "--greedy", "--device", "cpu"]

    unused = next(token for token in range(tokenizer.get_vocab_size()) if token not in free)
    _set_eos(directory, unused)
    assert main(argv) == 0
    assert capsys.readouterr().out == PROMPT + tokenizer.decode(free) + "\n"

    eos = free[2]
    _set_eos(directory, eos)
    assert main(argv) == 0
    stopped = free[:free.index(eos) + 1]
    assert capsys.readouterr().out == PROMPT + tokenizer.decode(stopped) + "\n"


def test_generate_hf_decodes_several_prompts_as_one_batch(
        hf_checkpoint: tuple[Path, Any, Any], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    source, model, tokenizer = hf_checkpoint
    directory = tmp_path / "hf"
    shutil.copytree(source, directory)
    prompts = [PROMPT, "class Point:\n    x", "hello"]  # different token lengths
    free = [_greedy_reference(model, tokenizer.encode(p).ids, 6) for p in prompts]
    eos = free[1][2]  # the second prompt stops early; the others run on (unless they meet it)
    _set_eos(directory, eos)
    argv = ["generate", "--hf", str(directory), "--max-new-tokens", "6", "--greedy",
            "--device", "cpu"]
    for prompt in prompts:
        argv += ["--prompt", prompt]
    assert main(argv) == 0
    expected = [p + tokenizer.decode(ids[:ids.index(eos) + 1] if eos in ids else ids) + "\n"
                for p, ids in zip(prompts, free, strict=True)]
    assert capsys.readouterr().out == "\n".join(expected)


def test_generate_hf_without_tokenizer_is_a_one_line_error(
        hf_checkpoint: tuple[Path, Any, Any], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "no-tokenizer"
    shutil.copytree(hf_checkpoint[0], directory)
    (directory / "tokenizer.json").unlink()
    err = _one_line_error(capsys, ["generate", "--hf", str(directory), "--prompt", "a"])
    assert f"{directory}: no tokenizer.json" in err


def test_generate_hf_without_the_tokenizers_package_is_a_one_line_error(
        hf_checkpoint: tuple[Path, Any, Any], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` now fails
    err = _one_line_error(capsys, ["generate", "--hf", str(hf_checkpoint[0]), "--prompt", "a",
                                   "--device", "cpu"])
    assert "pip install tokenizers" in err


def test_generate_takes_exactly_one_of_checkpoint_and_hf(
        hf_checkpoint: tuple[Path, Any, Any], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as both:
        main(["generate", "--hf", str(hf_checkpoint[0]), "--checkpoint", str(tmp_path),
              "--prompt", "a"])
    with pytest.raises(SystemExit) as neither:
        main(["generate", "--prompt", "a"])
    assert both.value.code == neither.value.code == 2  # argparse's usage error


TRAIN = ["--batch-size", "2", "--seq-len", "16", "--eval-every", "5", "--log-every", "5",
         "--device", "cpu", "--seed", "5", "--no-sample"]


def _history(run: Path, step: int) -> list[list[float]]:
    state = json.loads((run / "checkpoints" / f"step_{step:06d}" / "state.json").read_text())
    return state["history"]["train"]


def test_train_from_hf_resumes_exactly_and_generate_rebuilds_it(
        hf_checkpoint: tuple[Path, Any, Any], corpus_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    source = hf_checkpoint[0]
    run = tmp_path / "run"
    assert main(["train", "--init-from-hf", str(source), "--out", str(run), "--data",
                 str(corpus_file), "--steps", "5", "--save-every", "3", *TRAIN]) == 0
    out = capsys.readouterr().out
    assert f"model: {source} (LlamaForCausalLM)" in out
    assert f"tokenizer {source / 'tokenizer.json'}" in out  # the model's own, by default
    assert "note: the corpus is fed as bytes" not in out
    state = json.loads((run / "checkpoints" / "step_000003" / "state.json").read_text())
    assert state["hf_config"]["vocab_size"] == hf_checkpoint[2].get_vocab_size()
    assert state["train_options"]["init_from_hf"] == str(source)

    # Continue from step 3 (the HF directory is no longer needed): the same losses at 4 and 5.
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000005")
    (resumed / "checkpoints" / "latest").write_text("step_000003\n")
    hidden = tmp_path / "moved-away"
    source.rename(hidden)
    try:
        assert main(["train", "--out", str(resumed), "--resume", "--steps", "5",
                     "--no-sample"]) == 0
    finally:
        hidden.rename(source)
    assert "resumed from" in capsys.readouterr().out
    assert _history(resumed, 5) == _history(run, 5)

    assert main(["generate", "--checkpoint", str(resumed), "--prompt", "def ",
                 "--max-new-tokens", "6", "--greedy", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("def ")


def test_fine_tuning_with_the_models_tokenizer_lowers_the_held_out_loss(
        hf_checkpoint: tuple[Path, Any, Any], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from protoformer.generation import generate

    source, _, tokenizer = hf_checkpoint
    text = tmp_path / "text.txt"
    text.write_text("".join(TEXTS) * 40)
    run = tmp_path / "run"
    assert main(["train", "--init-from-hf", str(source), "--data", str(text), "--out", str(run),
                 "--steps", "30", "--eval-every", "5", "--log-every", "10", "--batch-size", "4",
                 "--seq-len", "32", "--warmup-steps", "5", "--device", "cpu", "--no-sample"]) == 0
    out = capsys.readouterr().out
    assert f"tokenizer {source / 'tokenizer.json'}" in out and "tokens from 1 file(s)" in out
    state = json.loads((run / "checkpoints" / "step_000030" / "state.json").read_text())
    held_out = [loss for _, loss in state["history"]["validation"]]  # the text's last 5%
    assert len(held_out) == 6 and held_out[-1] < held_out[0] - 1.0, held_out

    prompt = "def greet"
    assert main(["generate", "--checkpoint", str(run), "--prompt", prompt, "--max-new-tokens",
                 "8", "--greedy", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    model, _ = load_model(run, device="cpu")
    eos = tokenizer.token_to_id("</s>")
    with torch.no_grad():
        ids = generate(model, tokenizer.encode(prompt).ids, 8, greedy=True, stop_token_ids=(eos,))
    assert printed == prompt + tokenizer.decode(ids) + "\n"  # decoded by the model's tokenizer
    assert any(token >= 256 for token in ids), ids  # merged BPE tokens, not bytes


def test_train_from_hf_starts_from_its_weights(
        hf_checkpoint: tuple[Path, Any, Any], corpus_file: Path, tmp_path: Path) -> None:
    source, hf_model, _ = hf_checkpoint
    assert main(["train", "--init-from-hf", str(source), "--out", str(tmp_path), "--data",
                 str(corpus_file), "--steps", "1", "--lr", "1e-12", *TRAIN]) == 0
    model, _ = load_model(tmp_path, device="cpu")
    ours = to_hf(model)
    theirs = hf_model.state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize(("extra", "needle"), [
    (["--preset", "tiny"], "--preset and --init-from-hf"),
    (["--set", "self_attention.core_attention=x:Y"], "cannot be combined with a layer spec"),
    (["--backend", "fused"], "'local' backend"),
    (["--seq-len", str(MAX_POSITIONS + 1)], f"max_sequence_length={MAX_POSITIONS}"),
])
def test_train_from_hf_rejects_what_it_cannot_do(
        hf_checkpoint: tuple[Path, Any, Any], corpus_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], extra: list[str], needle: str) -> None:
    argv = ["train", "--init-from-hf", str(hf_checkpoint[0]), "--out", str(tmp_path), "--data",
            str(corpus_file), "--steps", "1", *TRAIN, *extra]
    assert needle in _one_line_error(capsys, argv)


# ------------------------------------------------------------------ T5 (encoder-decoder)


@pytest.fixture(scope="module")
def hf_t5_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    """(directory, transformers T5, tokenizer): a 2 + 2 layer T5 with the BPE tokenizer above."""
    import transformers

    tokenizer = _tokenizer()
    config = transformers.T5Config(
        vocab_size=tokenizer.get_vocab_size(), d_model=32, d_kv=8, d_ff=64, num_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=0,
        eos_token_id=tokenizer.token_to_id("</s>"), decoder_start_token_id=0)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    directory = tmp_path_factory.mktemp("hf-t5")
    model.save_pretrained(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory, model, tokenizer


def test_generate_hf_t5_prints_the_decoders_greedy_text(
        hf_t5_checkpoint: tuple[Path, Any, Any], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    source, model, tokenizer = hf_t5_checkpoint
    directory = tmp_path / "t5"
    shutil.copytree(source, directory)
    encoder_ids = torch.tensor([tokenizer.encode(PROMPT).ids])
    decoded = [0]  # the decoder start token
    with torch.no_grad():  # transformers' greedy decoding, the whole sequence each step
        for _ in range(8):
            logits = model(input_ids=encoder_ids, decoder_input_ids=torch.tensor([decoded])).logits
            decoded.append(int(logits[0, -1].argmax()))
    free = decoded[1:]
    unused = next(token for token in range(tokenizer.get_vocab_size()) if token not in free)
    _set_eos(directory, unused)
    argv = ["generate", "--hf", str(directory), "--prompt", PROMPT, "--max-new-tokens", "8",
            "--greedy", "--device", "cpu"]
    assert main(argv) == 0
    assert capsys.readouterr().out == tokenizer.decode(free) + "\n"
    assert _one_line_error(capsys, [*argv, "--cuda-graph", "on"]).count("decoder-only") == 1
