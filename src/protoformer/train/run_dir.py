"""A run directory (`--out`): checked before training starts, never mixed with another run.

A directory holds a run when it has any of `RUN_FILES` (checkpoints, metrics, loss curve,
config, TensorBoard events). A new run refuses such a directory unless told to `--resume`
it or to `--overwrite` it (which removes those entries, and nothing else); an `--out` that is
a file is refused at once, before a minute of training is spent.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from protoformer.train.checkpoint_files import CHECKPOINTS_DIR

__all__ = ["CONFIG_FILE", "RUN_FILES", "check_run_directory"]

CONFIG_FILE = "config.toml"
RUN_FILES = (CHECKPOINTS_DIR, "metrics.jsonl", "loss_curve.png", CONFIG_FILE, "tensorboard")


def check_run_directory(out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an `out_dir` a new run cannot use; with `overwrite`, clear the old run's entries.

    Raises `ValueError` saying what to do. Resuming needs the directory's run (its
    checkpoint is looked for by the caller).
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file; give a directory for the run's "
                         "checkpoints and logs")
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it; "
                         "give one of them")
    if resume or not out_dir.is_dir():
        return
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    if not found:
        return
    if not overwrite:
        raise ValueError(f"--out {out_dir} already holds a run ({', '.join(found)}); continue "
                         "it with --resume, replace it with --overwrite, or give another --out")
    for name in found:
        entry = out_dir / name
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
