"""Hostile or damaged checkpoint files: one bounded error, checksums mandatory.

A 10^5-deep state.json used to end in a RecursionError traceback, and a state.json without
its "files" entry loaded flipped weight bytes silently.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from protoformer.models import GPTModel
from protoformer.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_state,
    save_checkpoint,
)

MakeGPT = Callable[..., GPTModel]


@pytest.fixture
def saved(tmp_path: Path, make_gpt: MakeGPT) -> Path:
    return save_checkpoint(tmp_path, 3, make_gpt(), None, {})


def _edit_state(step_dir: Path, edit: Callable[[dict[str, object]], None]) -> None:
    path = step_dir / "state.json"
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


def _flip_a_weight_byte(step_dir: Path) -> None:
    path = step_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's data: still a readable safetensors file
    path.write_bytes(bytes(data))


def test_deeply_nested_state_is_one_checkpoint_error(saved: Path) -> None:
    (saved / "state.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match=r"state\.json: nested too deeply") as info:
        read_state(saved)
    assert len(str(info.value)) < 300


def test_moderately_deep_state_is_refused_too(saved: Path) -> None:
    # Deep enough for our own recursive code, shallow enough for json's parser.
    (saved / "state.json").write_text('{"step": 1, "x": ' + "[" * 500 + "]" * 500 + "}")
    with pytest.raises(CheckpointError, match="nested more than"):
        read_state(saved)


def test_huge_state_is_refused_without_reading_it_all(saved: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import protoformer.train.checkpoint_files as files

    monkeypatch.setattr(files, "MAX_STATE_BYTES", 1000)
    (saved / "state.json").write_text(json.dumps({"step": 1, "pad": "x" * 5000}))
    with pytest.raises(CheckpointError, match="larger than 1000 bytes"):
        read_state(saved)


def test_state_without_checksums_is_refused(saved: Path, make_gpt: MakeGPT) -> None:
    _edit_state(saved, lambda document: document.pop("files"))
    _flip_a_weight_byte(saved)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: state\.json records no size "
                                              r"and sha256.*--no-verify"):
        load_checkpoint(saved, make_gpt())


def test_state_with_a_malformed_checksum_record_is_refused(saved: Path, make_gpt: MakeGPT) -> None:
    _edit_state(saved, lambda document: document.__setitem__(
        "files", {"model.safetensors": {"bytes": "12"}}))
    with pytest.raises(CheckpointError, match="records no size and sha256"):
        load_checkpoint(saved, make_gpt())


def test_skipping_verification_is_the_users_explicit_choice(tmp_path: Path,
                                                           make_gpt: MakeGPT) -> None:
    original = make_gpt(seed=7)
    step_dir = save_checkpoint(tmp_path, 3, original, None, {})
    _edit_state(step_dir, lambda document: document.pop("files"))
    model = make_gpt(seed=0)
    load_checkpoint(step_dir, model, verify=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 original.state_dict().values(), strict=True))


def test_checksums_still_catch_flipped_bytes(saved: Path, make_gpt: MakeGPT) -> None:
    _flip_a_weight_byte(saved)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(saved, make_gpt())
