"""`--spec FILE`, `--set PATH=VALUE` and `--allow PREFIX`: a layer spec from data, on the CLI."""

from __future__ import annotations

import argparse

from protoformer.backends import BackendSpecProvider
from protoformer.recipes import Preset
from protoformer.recipes.spec_data import LayerSpecList, layer_spec_from_data
from protoformer.spec import DEFAULT_ALLOW

__all__ = ["add_spec_arguments", "layer_spec_from_args"]


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the spec-file options to a subcommand's parser."""
    parser.add_argument(
        "--spec", metavar="FILE", default=None,
        help="layer spec file (.json, .toml, .yaml) replacing the preset's recipe; builders are "
             "'package.module:Name' strings, imported only from allowed prefixes")
    parser.add_argument(
        "--set", metavar="PATH=VALUE", action="append", default=[], dest="overrides",
        help="override one slot or keyword, e.g. "
             "self_attention.core_attention=protoformer.transformer.core_attention:"
             "DotProductAttention; layers.3.PATH, layers.3-5.PATH or layers.*.PATH change "
             "some layers only (repeatable; applied after --spec)")
    parser.add_argument(
        "--allow", metavar="PREFIX", action="append", default=[],
        help=f"also allow importing builders from modules under PREFIX (default only "
             f"{', '.join(DEFAULT_ALLOW)}; repeatable)")


def layer_spec_from_args(args: argparse.Namespace, preset: Preset,
                         backend: BackendSpecProvider) -> LayerSpecList | None:
    """The layer spec `--spec`/`--set` describe, or None when neither was given.

    `--set` without `--spec` overrides the preset's own recipe. The result is checked by the
    runtime conformance check (a `SpecError` names the slot); anything but a transformer-layer
    spec is refused (see `protoformer.recipes.spec_data.layer_spec_from_data`).
    """
    path: str | None = args.spec
    return layer_spec_from_data(preset, backend, spec_file=path,
                                overrides=[str(item) for item in args.overrides],
                                allow=[str(prefix) for prefix in args.allow])
