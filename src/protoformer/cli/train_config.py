"""`protoformer train --config run.toml`: a TOML file of command-line flags.

Every flag of `train` is a key, spelled as the flag (`batch-size`) or its Python name
(`batch_size`); values are TOML values of the flag's type (`steps = 200`, `data = "txt/"`,
`bf16 = true`, `set = ["input_layernorm.eps=1e-6"]`). Flags given on the command line win
over the file, wherever they stand. An unknown key, or a value of the wrong type, is one
error line naming the key. `resolved_config` gives back the file a run was resolved to, so a
run directory's config.toml trains the same run again.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

__all__ = ["ConfigFileAction", "config_keys", "read_toml", "resolved_config", "toml_text"]


def read_toml(path: Path) -> dict[str, object]:
    """The parsed TOML file (tomllib on Python 3.11+, else the tomli package)."""
    if sys.version_info >= (3, 11):
        import tomllib as parser
    else:  # pragma: no cover - Python 3.10
        parser = importlib.import_module("tomli")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"--config {path}: cannot read ({error.strerror or error})") from error
    try:
        parsed: dict[str, object] = parser.loads(text)
    except ValueError as error:  # tomllib.TOMLDecodeError is a ValueError
        raise ValueError(f"--config {path}: not valid TOML ({error})") from error
    return parsed


def toml_text(values: Mapping[str, object]) -> str:
    """`values` as a TOML document (tomli-w)."""
    import tomli_w

    return tomli_w.dumps(dict(values))


def config_keys(actions: Sequence[argparse.Action]) -> dict[str, argparse.Action]:
    """Config key -> the flag's action: the long flag without dashes (`batch-size`), its
    underscore spelling (`batch_size`) and the flag's dest, when no flag is spelled so."""
    keys: dict[str, argparse.Action] = {}
    named: dict[str, argparse.Action] = {}
    for action in actions:
        if not action.option_strings or action.dest in ("help", "config"):
            continue
        keys.setdefault(action.dest, action)
        for option in action.option_strings:
            if option.startswith("--"):
                name = option[2:]
                named[name] = action
                named[name.replace("-", "_")] = action
    keys.update(named)
    return keys


def _flag(action: argparse.Action) -> str:
    longs = [option for option in action.option_strings if option.startswith("--")]
    return (longs or list(action.option_strings))[0]


def _convert(key: str, value: object, action: argparse.Action, where: Path) -> object:
    """`value` as the flag's parsed value, or ValueError naming the key."""
    def wrong(expected: str) -> ValueError:
        return ValueError(f"--config {where}: key {key!r} ({_flag(action)}) must be {expected}, "
                          f"got {value!r}")

    if action.nargs == 0:  # store_true / store_false / store_const flags
        if not isinstance(value, bool):
            raise wrong("true or false")
        const: object = action.const
        if value:
            return const
        return (not const) if isinstance(const, bool) else action.default
    if isinstance(action, argparse._AppendAction):  # pyright: ignore[reportPrivateUsage]  # argparse exposes no public action classes
        if not isinstance(value, list) or not all(isinstance(item, str)
                                                  for item in cast("list[object]", value)):
            raise wrong("a list of strings")
        return list(cast("list[str]", value))
    kind = action.type
    converted: object
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        converted = value
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        converted = float(value)
    else:
        if not isinstance(value, str):
            raise wrong("a string")
        converted = cast("Any", kind)(value) if callable(kind) else value
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"--config {where}: key {key!r} is {value!r}; choose from "
                         f"{', '.join(str(choice) for choice in action.choices)}")
    return converted


class ConfigFileAction(argparse.Action):
    """`--config FILE`: sets every flag the file names that was not given on the command line.

    Flags after `--config` are parsed later and overwrite what it set; flags before it are
    recognised because their value is no longer the flag's default object.
    """

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        path = Path(str(values))
        actions = config_keys(parser._actions)  # pyright: ignore[reportPrivateUsage]  # argparse has no public list of a parser's actions
        for key, value in read_toml(path).items():
            action = actions.get(key)
            if action is None:
                known = sorted({_flag(a).lstrip("-") for a in actions.values()})
                raise ValueError(f"--config {path}: unknown key {key!r}; the keys are the flags "
                                 f"of protoformer train: {', '.join(known)}")
            converted = _convert(key, value, action, path)
            if getattr(namespace, action.dest, None) is action.default:  # not given before
                setattr(namespace, action.dest, converted)
        setattr(namespace, self.dest, path)


def resolved_config(values: Mapping[str, object]) -> dict[str, object]:
    """TOML-ready values: Paths as strings, tuples as lists, None left out."""
    document: dict[str, object] = {}
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, Path):
            document[key] = str(value)
        elif isinstance(value, (tuple, list)):
            document[key] = [str(item) if isinstance(item, Path) else item
                             for item in cast("Sequence[object]", value)]
        else:
            document[key] = value
    return document
