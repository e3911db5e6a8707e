"""A small trained run shared by the CLI tests (trained once per session through `main`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from protoformer.cli import main

SMALL_TRAIN = ["--steps", "4", "--batch-size", "2", "--seq-len", "16", "--eval-every", "2",
               "--save-every", "2", "--log-every", "2", "--device", "cpu", "--seed", "3"]


@pytest.fixture(scope="session")
def small_train() -> list[str]:
    """Flags for a few-second training run."""
    return list(SMALL_TRAIN)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("def greet(name):\n    return 'hello ' + name\n\n" * 60)
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--out", str(out), "--data", str(corpus_file), "--no-sample",
                 *SMALL_TRAIN]) == 0
    return out
