"""The `protoformer` command: `train`, `prepare-data`, `generate`, `export`, `inspect`, `check`.

Errors in what the user gave (an unknown preset, a missing file, a corrupt checkpoint, a
miswired spec, an optional package that is not installed) print one line,
`protoformer: error: ...`, and exit with status 1; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from protoformer.cli import check, export, generate, inspect, prepare_data, train
from protoformer.distributed import DEBUG_VARIABLE, debug_enabled
from protoformer.spec import SpecError
from protoformer.train.checkpoint import CheckpointError

__all__ = ["build_parser", "error_line", "main"]

PROGRAM = "protoformer"
MAX_ERROR_LINE = 2000
USER_ERRORS: tuple[type[BaseException], ...] = (SpecError, CheckpointError, ValueError, OSError,
                                               ImportError)
"""Errors in what the user gave: one line, no traceback (unless --debug)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per module of this package."""
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Train, sample, inspect and check protoformer models and specs.")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of every error, user errors too (also "
                             f"{DEBUG_VARIABLE}=1; accepted anywhere on the command line)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train.add_parser(commands)
    prepare_data.add_parser(commands)
    generate.add_parser(commands)
    export.add_parser(commands)
    inspect.add_parser(commands)
    check.add_parser(commands)
    return parser


def error_line(error: BaseException) -> str:
    """`error` as one line: a multi-line message has its lines joined, and a huge one cut to
    `MAX_ERROR_LINE` characters (a value quoted from a hostile file must not flood the
    terminal)."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        text = f"{error.filename}: {error.strerror}"
    else:
        text = str(error) or type(error).__name__
    line = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return line if len(line) <= MAX_ERROR_LINE else line[:MAX_ERROR_LINE - 3] + "..."


def _take_debug_flag(argv: Sequence[str] | None) -> list[str]:
    """`argv` without `--debug` (before any `--`), setting PROTOFORMER_DEBUG when it was there."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    end = arguments.index("--") if "--" in arguments else len(arguments)
    if "--debug" in arguments[:end]:
        os.environ[DEBUG_VARIABLE] = "1"
        arguments = [a for a in arguments[:end] if a != "--debug"] + arguments[end:]
    return arguments


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default: `sys.argv[1:]`); returns the exit status."""
    parser = build_parser()
    arguments = _take_debug_flag(argv)
    try:
        # Inside the try: `train --config FILE` reads the file while the flags are parsed.
        args = parser.parse_args(arguments)
        status: int = args.handler(args)
    except BrokenPipeError:  # stdout closed early (`protoformer inspect X | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except USER_ERRORS as error:
        if debug_enabled():
            traceback.print_exc()
        print(f"{PROGRAM}: error: {error_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROGRAM}: interrupted", file=sys.stderr)
        return 130
    return status
