"""`protoformer export`: a sharded (torch_dist) run becomes one safetensors checkpoint that
`generate` / `load_checkpoint` read, and a Hugging Face checkpoint; both hold the trained
weights (compared with the model the training returned, not with a re-load of the run)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from protoformer.cli import main
from protoformer.cli.generate import load_model
from protoformer.interop import from_hf
from protoformer.models import GPTModel
from protoformer.train.checkpoint import STATE_FILE, latest_checkpoint
from protoformer.train.loop import TrainOptions, train


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path
                ) -> tuple[Path, GPTModel]:
    out = tmp_path_factory.mktemp("sharded")
    result = train(TrainOptions(preset="tiny", device="cpu", steps=2, batch_size=2, seq_len=16,
                                eval_every=2, eval_batches=1, save_every=2, data=corpus_file,
                                out_dir=out, progress=False, ckpt_format="torch_dist"))
    latest = latest_checkpoint(out)
    assert latest is not None and (latest / "dcp" / ".metadata").is_file()
    return out, result.model


def _same_weights(model: torch.nn.Module, expected: torch.nn.Module) -> None:
    reference = dict(expected.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), reference[name].detach(), msg=name)


def test_export_safetensors_is_a_single_process_checkpoint(
        sharded_run: tuple[Path, GPTModel], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, trained = sharded_run
    out = tmp_path / "single"
    assert main(["export", str(run_dir), "--format", "safetensors", "--out", str(out)]) == 0
    step_dir = latest_checkpoint(out)
    assert step_dir is not None and (step_dir / "model.safetensors").is_file()
    assert not (step_dir / "dcp").exists() and '"layout"' not in (step_dir / STATE_FILE).read_text()
    model, _ = load_model(out)
    _same_weights(model, trained)
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(out), "--prompt", "def ",
                 "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    # An existing, non-empty --out is refused with one line.
    assert main(["export", str(run_dir), "--format", "safetensors", "--out", str(out)]) == 1
    assert "not an empty directory" in capsys.readouterr().err


def test_export_hf_holds_the_trained_model(sharded_run: tuple[Path, GPTModel],
                                           tmp_path: Path) -> None:
    run_dir, trained = sharded_run
    out = tmp_path / "hf"
    assert main(["export", str(run_dir), "--format", "hf", "--out", str(out)]) == 0
    assert (out / "config.json").is_file()
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    trained.eval()
    with torch.no_grad():
        expected = trained(tokens)
        torch.testing.assert_close(from_hf(out)(tokens), expected)
    if importlib.util.find_spec("transformers") is not None:
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(tokens).logits, expected, atol=1e-4, rtol=1e-4)
