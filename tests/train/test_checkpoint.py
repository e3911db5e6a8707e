"""Checkpoints: round trips, tied weights, atomic writes and clear errors for bad files."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from protoformer.models import GPTModel
from protoformer.train import checkpoint as ckpt
from protoformer.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)

MakeGPT = Callable[..., GPTModel]


def _train_a_little(model: nn.Module, steps: int = 2) -> torch.optim.AdamW:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        ids = torch.randint(0, 256, (2, 9))
        loss = model(ids[:, :-1], ids[:, 1:]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return optimizer


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v for i, s in optimizer.state_dict()["state"].items()
            for k, v in s.items() if isinstance(v, torch.Tensor)}


def test_round_trip_restores_weights_optimizer_and_state(tmp_path: Path, make_gpt: MakeGPT) -> None:
    model = make_gpt()
    optimizer = _train_a_little(model)
    step_dir = save_checkpoint(tmp_path, 7, model, optimizer, {"note": "hello", "nested": [1, 2.5]})
    assert step_dir == tmp_path / "checkpoints" / "step_000007"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000007"
    assert latest_checkpoint(tmp_path) == step_dir

    other = make_gpt(seed=1)
    other_optimizer = torch.optim.AdamW(other.parameters(), lr=5.0)
    state = load_checkpoint(step_dir, other, other_optimizer)
    assert state["step"] == 7 and state["note"] == "hello" and state["nested"] == [1, 2.5]
    assert _same_weights(model, other)
    expected, got = _optimizer_tensors(optimizer), _optimizer_tensors(other_optimizer)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert other_optimizer.param_groups[0]["lr"] == 1e-3
    assert other_optimizer.param_groups[0]["betas"] == optimizer.param_groups[0]["betas"]


class _TiedModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(16, 4)
        self.head = nn.Linear(4, 16, bias=False)
        self.head.weight = self.embedding.weight  # the same Parameter under two names


def test_tied_weights_are_written_once_and_stay_tied(tmp_path: Path) -> None:
    model = _TiedModule()
    step_dir = save_checkpoint(tmp_path, 1, model, None, {})
    with safe_open(str(step_dir / "model.safetensors"), framework="pt") as handle:
        assert list(handle.keys()) == ["embedding.weight"]
    restored = _TiedModule()
    load_checkpoint(step_dir, restored)
    assert torch.equal(restored.embedding.weight, model.embedding.weight)
    assert restored.head.weight is restored.embedding.weight


def test_gpt_with_tied_embeddings_round_trips(tmp_path: Path, make_gpt: MakeGPT) -> None:
    model = make_gpt(tied=True)
    optimizer = _train_a_little(model)
    step_dir = save_checkpoint(tmp_path, 3, model, optimizer, {})
    restored = make_gpt(tied=True, seed=5)
    load_checkpoint(step_dir, restored, torch.optim.AdamW(restored.parameters()))
    ids = torch.randint(0, 256, (1, 12))
    assert torch.equal(model(ids), restored(ids))


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path: Path, make_gpt: MakeGPT,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_gpt()
    optimizer = _train_a_little(model)
    first = save_checkpoint(tmp_path, 1, model, optimizer, {"which": "first"})
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    _train_a_little(model)  # the weights move on

    def crash(path: Path, text: str) -> None:  # dies after both safetensors files are written
        path.write_text(text[: len(text) // 2])
        raise OSError("simulated crash while writing state.json")

    monkeypatch.setattr(ckpt, "_write_text", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path, 2, model, optimizer, {"which": "second"})
    monkeypatch.undo()

    assert latest_checkpoint(tmp_path) == first
    assert not (tmp_path / "checkpoints" / "step_000002").exists()
    restored = make_gpt(seed=3)
    state = load_checkpoint(resolve_checkpoint(tmp_path), restored,
                            torch.optim.AdamW(restored.parameters()))
    assert state["which"] == "first"
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in saved.items())


def test_a_kill_before_publishing_leaves_the_previous_checkpoint(tmp_path: Path, make_gpt: MakeGPT,
                                                                 monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    model = make_gpt()
    first = save_checkpoint(tmp_path, 1, model, None, {})

    def killed(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        raise KeyboardInterrupt  # the process dies at the rename, after every file is written

    monkeypatch.setattr(os, "replace", killed)
    monkeypatch.setattr(ckpt.shutil, "rmtree", lambda *a, **k: None)  # and cleans nothing up
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model, None, {})
    monkeypatch.undo()

    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert leftovers  # the half-done write is still there...
    assert latest_checkpoint(tmp_path) == first  # ...but invisible
    load_checkpoint(first, make_gpt())
    save_checkpoint(tmp_path, 2, model, None, {})  # the next save cleans it up
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_000002"


def test_saving_the_same_step_again_replaces_it(tmp_path: Path, make_gpt: MakeGPT) -> None:
    model = make_gpt()
    save_checkpoint(tmp_path, 4, model, None, {"version": 1})
    step_dir = save_checkpoint(tmp_path, 4, model, None, {"version": 2})
    assert ckpt.read_state(step_dir)["version"] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000004"]


def test_a_kill_in_the_middle_of_re_saving_a_step_loses_nothing(
        tmp_path: Path, make_gpt: MakeGPT, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_gpt()
    published = save_checkpoint(tmp_path, 4, model, None, {"version": 1})
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    real_replace = os.replace
    calls: list[str] = []

    def dies_on_the_second_rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls.append(str(dst))
        if len(calls) == 2:  # the old copy is aside, the new one not yet in place
            raise KeyboardInterrupt
        real_replace(src, dst)

    _train_a_little(model, 1)
    monkeypatch.setattr(os, "replace", dies_on_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 4, model, None, {"version": 2})
    monkeypatch.undo()
    assert not published.exists()  # the window: `latest` names a directory that is aside

    found = latest_checkpoint(tmp_path)  # readers find the published copy...
    assert found is not None and ckpt.read_state(found)["version"] == 1
    restored = make_gpt()
    load_checkpoint(found, restored)
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in expected.items())
    save_checkpoint(tmp_path, 5, model, None, {})  # ...and the next save puts it back
    assert ckpt.read_state(published)["version"] == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest", "step_000004", "step_000005"]


@pytest.fixture
def saved(tmp_path: Path, make_gpt: MakeGPT) -> Path:
    model = make_gpt()
    return save_checkpoint(tmp_path, 5, model, _train_a_little(model, 1), {})


def _load(step_dir: Path, make_gpt: MakeGPT) -> None:
    model = make_gpt()
    load_checkpoint(step_dir, model, torch.optim.AdamW(model.parameters()))


def test_truncated_weights_are_reported_with_the_file(saved: Path, make_gpt: MakeGPT) -> None:
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        _load(saved, make_gpt)


def test_flipped_bytes_are_reported_as_corrupt(saved: Path, make_gpt: MakeGPT) -> None:
    path = saved / "optimizer.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors.*corrupt"):
        _load(saved, make_gpt)


def test_garbage_in_place_of_safetensors_is_reported(saved: Path, make_gpt: MakeGPT) -> None:
    document = json.loads((saved / "state.json").read_text())
    del document["files"]  # no size/checksum record: safetensors' own parser must catch it
    (saved / "state.json").write_text(json.dumps(document))
    (saved / "model.safetensors").write_bytes(b"not a safetensors file at all")
    model = make_gpt()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors"):
        # Without checksums only an explicit verify=False gets as far as the parser.
        load_checkpoint(saved, model, torch.optim.AdamW(model.parameters()), verify=False)


def test_missing_files_are_named(saved: Path, make_gpt: MakeGPT) -> None:
    (saved / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors: missing"):
        _load(saved, make_gpt)
    (saved / "state.json").unlink()
    with pytest.raises(CheckpointError, match=r"state\.json: missing"):
        _load(saved, make_gpt)


def test_a_model_of_another_shape_is_rejected_with_names_and_shapes(saved: Path, make_gpt: MakeGPT) -> None:
    model = make_gpt(hidden_size=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"embedding\.weight has shape \(256, 32\), the model "
                                              r"expects \(256, 64\)"):
        load_checkpoint(saved, model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # untouched


def test_a_model_with_other_tensor_names_is_rejected(saved: Path) -> None:
    with pytest.raises(CheckpointError, match=r"missing tensors .*unexpected tensors"):
        load_checkpoint(saved, _TiedModule())


def test_resolving_a_path_without_a_checkpoint_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_000009\n")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path)


def test_run_checkpoints_and_step_directories_all_resolve(saved: Path) -> None:
    run_dir = saved.parent.parent
    assert resolve_checkpoint(run_dir) == saved
    assert resolve_checkpoint(run_dir / "checkpoints") == saved
    assert resolve_checkpoint(saved) == saved


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoint_files_and_directories_honour_the_umask(tmp_path: Path, make_gpt: MakeGPT,
                                                           umask: int) -> None:
    extra = tmp_path / "tokenizer.json"
    extra.write_text("{}")
    previous = os.umask(umask)
    try:
        step_dir = save_checkpoint(tmp_path / "run", 1, make_gpt(), None, {},
                                   extra_files={"tokenizer.json": extra})
    finally:
        os.umask(previous)
    assert step_dir.stat().st_mode & 0o777 == 0o777 & ~umask
    for name in ("model.safetensors", "state.json", "tokenizer.json"):
        assert (step_dir / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    files = json.loads((step_dir / "state.json").read_text())["files"]
    assert files["tokenizer.json"]["bytes"] == 2  # copied in, with size and checksum recorded
