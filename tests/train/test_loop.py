"""The training loop on the tiny preset: the loss falls, and a resumed run continues exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from protoformer.train.checkpoint import latest_checkpoint
from protoformer.train.loop import StepMetrics, TrainOptions, build_optimizer, train


def _options(out: Path, **overrides: object) -> TrainOptions:
    settings: dict[str, object] = {
        "preset": "tiny", "steps": 30, "out_dir": out, "batch_size": 8, "seq_len": 32,
        "lr": 3e-3, "warmup_steps": 5, "eval_every": 10, "eval_batches": 2, "save_every": 10,
        "log_every": 10, "seed": 0, "device": "cpu", "max_corpus_bytes": 200_000,
        "progress": False}
    settings.update(overrides)
    return TrainOptions(**settings)  # type: ignore[arg-type]


def test_the_tiny_model_learns_the_corpus(tmp_path: Path) -> None:
    result = train(_options(tmp_path))
    losses = [loss for _, loss in result.train_losses]
    assert len(losses) == 30
    assert abs(losses[0] - torch.log(torch.tensor(256.0)).item()) < 0.5  # starts near uniform
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5
    assert [step for step, _ in result.validation_losses] == [10, 20, 30]
    assert result.validation_losses[-1][1] < result.validation_losses[0][1]
    assert result.checkpoint == tmp_path / "checkpoints" / "step_000030"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest", "step_000010", "step_000020", "step_000030"]
    assert result.loss_curve is not None and result.loss_curve.read_bytes()[:4] == b"\x89PNG"


def test_a_resumed_run_repeats_the_uninterrupted_losses_exactly(tmp_path: Path) -> None:
    settings = {"steps": 12, "save_every": 4, "eval_every": 4}
    uninterrupted = train(_options(tmp_path / "a", **settings))

    def crash_at_step_6(metrics: StepMetrics) -> None:
        if metrics.step == 6:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_options(tmp_path / "b", **settings), on_step=crash_at_step_6)
    assert latest_checkpoint(tmp_path / "b") == tmp_path / "b" / "checkpoints" / "step_000004"

    resumed = train(_options(tmp_path / "b", resume=True, **settings))
    assert resumed.steps_run == 8
    assert resumed.train_losses == uninterrupted.train_losses  # steps 1-4 from the checkpoint
    assert resumed.validation_losses == uninterrupted.validation_losses
    final_a = uninterrupted.model.state_dict()
    assert all(torch.equal(v, final_a[k]) for k, v in resumed.model.state_dict().items())


def test_resuming_with_other_run_settings_is_refused(tmp_path: Path) -> None:
    train(_options(tmp_path, steps=2, save_every=2))
    with pytest.raises(ValueError, match=r"batch_size: checkpoint 8, now 4"):
        train(_options(tmp_path, steps=4, batch_size=4, resume=True))


def test_resuming_on_changed_data_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "corpus.txt"
    data.write_text("the quick brown fox jumps over the lazy dog\n" * 200, encoding="utf-8")
    out = tmp_path / "run"
    train(_options(out, steps=2, save_every=2, data=data))
    state = json.loads((out / "checkpoints" / "step_000002" / "state.json").read_text())
    assert state["corpus"]["bytes"] == data.stat().st_size
    with data.open("a", encoding="utf-8") as handle:  # same path, other contents
        handle.write("one more line\n")
    with pytest.raises(ValueError, match="training data changed since it was saved"):
        train(_options(out, steps=4, save_every=2, data=data, resume=True))
    data.write_text("the quick brown fox jumps over the lazy dog\n" * 200, encoding="utf-8")
    assert train(_options(out, steps=4, save_every=2, data=data, resume=True)).steps_run == 2


def test_resuming_without_a_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no checkpoint"):
        train(_options(tmp_path, resume=True))


def test_the_checkpoint_records_what_resumption_needs(tmp_path: Path) -> None:
    train(_options(tmp_path, steps=3, save_every=3, eval_every=3))
    state = json.loads((tmp_path / "checkpoints" / "step_000003" / "state.json").read_text())
    assert state["step"] == 3 and state["preset"] == "tiny"
    assert set(state["rng"]) >= {"torch_cpu"}
    assert state["sampler"]["batches_drawn"] == 3
    assert state["train_options"]["batch_size"] == 8
    assert len(state["history"]["train"]) == 3


def test_weight_decay_applies_to_matrices_only(tiny_model: torch.nn.Module) -> None:
    optimizer = build_optimizer(tiny_model, TrainOptions(weight_decay=0.25))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.25 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and decayed["params"]
    assert all(p.dim() < 2 for p in plain["params"]) and plain["params"]
    assert len(decayed["params"]) + len(plain["params"]) == len(list(tiny_model.parameters()))


@pytest.mark.parametrize(("field", "value"), [("steps", 0), ("lr", -1.0), ("batch_size", 0),
                                              ("device", "tpu")])
def test_bad_options_are_rejected(tmp_path: Path, field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        _options(tmp_path, **{field: value})


def test_a_sequence_longer_than_the_preset_allows_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_sequence_length"):
        train(_options(tmp_path, seq_len=10_000))


def test_without_matplotlib_the_plot_is_skipped_with_a_note(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result = train(_options(tmp_path, steps=2, save_every=2))
    assert result.loss_curve is None and not (tmp_path / "loss_curve.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_full_recomputation_is_applied_and_leaves_the_losses_unchanged(tmp_path: Path) -> None:
    from protoformer.cli import build_parser
    from protoformer.cli.train import options_from_args

    args = build_parser().parse_args(["train", "--recompute-granularity", "full"])
    assert options_from_args(args).recompute_granularity == "full"
    settings = {"steps": 3, "save_every": 3, "eval_every": 3}
    plain = train(_options(tmp_path / "plain", **settings))
    calls = 0

    def count_layer_forwards(*_: object) -> None:
        nonlocal calls
        calls += 1

    recomputed = train(_options(tmp_path / "full", recompute_granularity="full", **settings))
    layers = list(recomputed.model.decoder.layers)
    assert all(layer.config.recompute_granularity == "full" for layer in layers)
    assert plain.model.decoder.layers[0].config.recompute_granularity is None
    # Recomputation runs the layer's attention a second time in backward (torch stops the
    # replay once the saved tensors are back, so the MLP's own hook may not fire again).
    recomputed.model.train()
    handle = layers[0].self_attention.register_forward_hook(count_layer_forwards)
    batch = torch.randint(0, 256, (2, 16))
    recomputed.model(batch).float().sum().backward()
    handle.remove()
    assert calls == 2
    for (step_a, loss_a), (step_b, loss_b) in zip(plain.train_losses, recomputed.train_losses,
                                                  strict=True):
        assert step_a == step_b and abs(loss_a - loss_b) < 1e-5
    with pytest.raises(ValueError, match="recompute_granularity='sometimes'"):
        _options(tmp_path / "bad", recompute_granularity="sometimes")
