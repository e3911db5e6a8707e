"""The `protoformer` command: `train`, `prepare-data`, `generate`, `inspect` and `check`.

Errors in what the user gave (an unknown preset, a missing file, a corrupt checkpoint, a
miswired spec, an optional package that is not installed) print one line,
`protoformer: error: ...`, and exit with status 1; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from protoformer.cli import check, generate, inspect, prepare_data, train
from protoformer.spec import SpecError
from protoformer.train.checkpoint import CheckpointError

__all__ = ["build_parser", "error_line", "main"]

PROGRAM = "protoformer"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per module of this package."""
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Train, sample, inspect and check protoformer models and specs.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train.add_parser(commands)
    prepare_data.add_parser(commands)
    generate.add_parser(commands)
    inspect.add_parser(commands)
    check.add_parser(commands)
    return parser


def error_line(error: BaseException) -> str:
    """`error` as one line: a multi-line message has its lines joined."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        text = f"{error.filename}: {error.strerror}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default: `sys.argv[1:]`); returns the exit status."""
    parser = build_parser()
    try:
        # Inside the try: `train --config FILE` reads the file while the flags are parsed.
        args = parser.parse_args(argv)
        status: int = args.handler(args)
    except BrokenPipeError:  # stdout closed early (`protoformer inspect X | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (SpecError, CheckpointError, ValueError, OSError, ImportError) as error:
        print(f"{PROGRAM}: error: {error_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROGRAM}: interrupted", file=sys.stderr)
        return 130
    return status
