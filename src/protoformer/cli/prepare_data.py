"""`protoformer prepare-data`: tokenize text into memory-mapped token shards for `train --data`.

    protoformer prepare-data my_text/ --tokenizer ./my-model --out data/my_text

writes `data/my_text/shard_00000.bin ...`, `index.json` (sizes, sha256 checksums, the
validation split) and a copy of the tokenizer; `protoformer train --data data/my_text` then
streams the shards and trains with that tokenizer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Protocol

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from protoformer.train.prepare_data import DEFAULT_SHARD_TOKENS, prepare_data
from protoformer.train.tokenizer import BYTE_TOKENIZER, load_run_tokenizer

__all__ = ["add_parser", "run"]


class _Subparsers(Protocol):
    def add_parser(self, name: str, *, help: str, description: str) -> argparse.ArgumentParser: ...


def add_parser(commands: _Subparsers) -> None:
    parser = commands.add_parser(
        "prepare-data", help="tokenize text files into token shards for train --data",
        description="Tokenize text into memory-mapped token shards (uint16 ids below 65,536, "
                    "else uint32) with an index.json of sizes and sha256 checksums, and copy the "
                    "tokenizer next to them. SOURCE is a text file, a .jsonl file (one JSON "
                    "object per line), a .parquet file (needs pyarrow) or a directory of them; "
                    "hidden and binary files are skipped. Train on the result with "
                    "`protoformer train --data OUT`.")
    parser.add_argument("source", type=Path, metavar="SOURCE",
                        help="a text, .jsonl or .parquet file, or a directory of them")
    parser.add_argument("--out", type=Path, required=True,
                        help="the dataset directory to write (new or empty)")
    parser.add_argument("--tokenizer", default=BYTE_TOKENIZER, metavar="PATH",
                        help="a tokenizer.json file or a directory holding one (e.g. a Hugging "
                             f"Face checkpoint); '{BYTE_TOKENIZER}' for byte-level tokens "
                             f"(default {BYTE_TOKENIZER})")
    parser.add_argument("--text-key", default="text",
                        help="the field of a .jsonl object / column of a .parquet file that "
                             "holds the text (default text)")
    parser.add_argument("--validation-fraction", type=float, default=0.05,
                        help="the share of tokens, at the end, held out for validation "
                             "(default 0.05)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                        help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS:,})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the dataset already in --out")
    parser.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                        help="show a progress bar (auto: on a terminal)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    tokenizer = load_run_tokenizer(str(args.tokenizer))
    progress = Progress(TextColumn("[bold]tokenize"), BarColumn(), DownloadColumn(),
                        TransferSpeedColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                        disable=args.progress == "off"
                        or (args.progress == "auto" and not sys.stdout.isatty()))
    with progress:
        task = progress.add_task("tokenize", total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        prepared = prepare_data(Path(args.source), Path(args.out), tokenizer,
                                text_key=str(args.text_key),
                                validation_fraction=float(args.validation_fraction),
                                shard_tokens=int(args.shard_tokens),
                                overwrite=bool(args.overwrite), on_progress=advance)
    index = prepared.index
    print(f"{index.num_tokens:,} tokens ({index.dtype}) from {index.num_documents:,} document(s) "
          f"in {prepared.num_files} file(s), {index.text_bytes:,} bytes of text "
          f"({index.bytes_per_token:.2f} bytes per token); tokenizer {tokenizer.describe()}")
    print(f"{len(index.shards)} shard(s) in {index.directory}, the last "
          f"{index.validation_tokens:,} tokens held out for validation")
    if prepared.skipped_files:
        shown = ", ".join(prepared.skipped_files[:3])
        more = " ..." if len(prepared.skipped_files) > 3 else ""
        print(f"skipped {len(prepared.skipped_files)} binary file(s): {shown}{more}")
    print(f"train on it: protoformer train --data {index.directory}")
    return 0
