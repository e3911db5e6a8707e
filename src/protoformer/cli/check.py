"""`protoformer check FILE.py[:FUNCTION]`: build a user's recipe and report every spec problem.

The function is called with `(backend, config)` when it takes arguments (the local backend
and the tiny preset's config unless `--backend`/`--preset` say otherwise) or with none. A miswired slot raises `SpecError` while the
spec is built; its message names each slot and mismatch, and all of them are printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import sys
import traceback
import typing
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Protocol, cast

from protoformer.backends import get_backend
from protoformer.cli.spec_tree import walk_spec
from protoformer.recipes import get_preset
from protoformer.spec import SpecError, Submodules, spec_equal, validate_submodules
from protoformer.spec.layers import LAYERS_PATH, layer_groups, range_label

__all__ = ["CheckResult", "add_parser", "check_recipe", "run"]

DEFAULT_FUNCTION = "spec"


class _Subparsers(Protocol):
    def add_parser(self, name: str, *, help: str, description: str) -> argparse.ArgumentParser: ...


def add_parser(commands: _Subparsers) -> None:
    parser = commands.add_parser(
        "check", help="build a recipe from a Python file and report every spec problem",
        description="Import FILE.py, call FUNCTION (default: `spec`, or the file's only "
                    "public function returning a Submodules record) with (backend, config) "
                    "when it takes arguments, and report every miswired slot. Exit status 1 "
                    "when a problem is found.")
    parser.add_argument("target", metavar="FILE.py[:FUNCTION]", help="the recipe to check")
    parser.add_argument("--preset", default="tiny",
                        help="preset whose config the recipe is called with (default tiny; "
                             "an MLA recipe needs an MLA preset such as tiny-mla)")
    parser.add_argument("--backend", default="local", help="backend passed to the recipe "
                                                             "(default local)")
    parser.set_defaults(handler=run)


class CheckResult(typing.NamedTuple):
    """The outcome: the problems found (empty when fine) and the number of slots checked."""

    function: str
    problems: list[str]
    slots_checked: int


def _split_target(target: str) -> tuple[Path, str | None]:
    path, separator, function = target.rpartition(":")
    if separator and path and function.isidentifier():
        return Path(path), function
    return Path(target), None


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise FileNotFoundError(2, "no such recipe file", str(path))
    name = f"protoformer_recipe_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    directory = str(path.resolve().parent)
    sys.path.insert(0, directory)  # so the recipe can import its neighbours
    try:
        spec.loader.exec_module(module)
    except SyntaxError as error:
        raise ValueError(f"{path}:{error.lineno}: syntax error: {error.msg}; fix the recipe "
                         "file") from error
    except SpecError:
        raise
    except Exception as error:  # the user's file: report it in one line, not a traceback
        raise _recipe_error(f"importing {path}", path, error) from error
    finally:
        sys.path.remove(directory)
    return module


def _recipe_error(what: str, path: Path, error: Exception) -> ValueError:
    """`error` raised by the user's recipe as one line, with the recipe's line that raised it."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if Path(frame.filename).resolve() == path.resolve()]
    where = f" (at {path}:{frames[-1].lineno})" if frames else ""
    return ValueError(f"{what} raised {type(error).__name__}: {error}{where}")


def _returns_submodules(function: Callable[..., object]) -> bool:
    try:
        hint = typing.get_type_hints(function).get("return")
    except Exception:  # unresolvable annotations: not a recipe we can recognise
        return False
    return isinstance(hint, type) and issubclass(hint, Submodules)


def _find_function(module: ModuleType, path: Path, wanted: str | None) -> Callable[..., object]:
    if wanted is not None:
        found: object = getattr(module, wanted, None)
        if not callable(found):
            raise ValueError(f"{path} has no function {wanted!r}")
        return found
    default: object = getattr(module, DEFAULT_FUNCTION, None)
    if callable(default):
        return default
    candidates: list[Callable[..., object]] = [
        value for key, value in vars(module).items()
        if not key.startswith("_") and inspect.isfunction(value)
        and value.__module__ == module.__name__ and _returns_submodules(value)]
    if len(candidates) != 1:
        found_names = ", ".join(c.__name__ for c in candidates) or "none"
        raise ValueError(f"{path}: name the recipe as {path}:FUNCTION; there is no `spec` "
                         f"function and {len(candidates)} public functions return a "
                         f"Submodules record ({found_names})")
    return candidates[0]


def _takes_arguments(function: Callable[..., object]) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
               for p in parameters)


def _problems_of(error: SpecError) -> list[str]:
    return [line for line in str(error).splitlines() if line.strip()]


def check_recipe(target: str, *, preset: str = "tiny", backend: str = "local") -> CheckResult:
    """Import and call the recipe named by `FILE.py[:FUNCTION]`, collecting spec problems.

    A recipe taking arguments gets `(get_backend(backend), get_preset(preset).config())`.
    """
    path, wanted = _split_target(target)
    try:
        module = _import_file(path)
    except SpecError as error:  # a spec built at import time
        return CheckResult(f"{path} (import)", _problems_of(error), 0)
    function = _find_function(module, path, wanted)
    label = f"{path}:{getattr(function, '__name__', wanted)}"
    arguments = ((get_backend(backend), get_preset(preset).config_factory())
                 if _takes_arguments(function) else ())
    try:
        result = function(*arguments)
    except SpecError as error:
        return CheckResult(label, _problems_of(error), 0)
    except Exception as error:  # e.g. a Submodules record missing a slot: a TypeError
        raise _recipe_error(f"{label}", path, error) from error
    problems: list[str] = []
    slots_checked = 0
    for prefix, spec in _specs_of(result, label):
        # Construction checked each record; check again in case one was edited afterwards.
        entries = list(walk_spec(spec, prefix))
        records = [(prefix, spec)] + [(e.path, e.value) for e in entries
                                      if isinstance(e.value, Submodules)]
        for where, record in records:
            try:
                validate_submodules(record)
            except SpecError as error:
                lines = _problems_of(error)
                problems += [f"at {where}: {lines[0]}" if where else lines[0], *lines[1:]]
        slots_checked += sum(not e.is_record for e in entries)
    return CheckResult(label, problems, slots_checked)


def _specs_of(result: object, label: str) -> list[tuple[str, Submodules]]:
    """(path prefix, record) to check: the one record, or each group of equal neighbouring
    layers of a per-layer list (prefix `layers.0-2`)."""
    kind = type(result).__qualname__
    if isinstance(result, Submodules):
        return [("", result)]
    if isinstance(result, (list, tuple)):
        sequence = cast("list[object]", result)
        specs: list[object] = list(sequence)
        records = [spec for spec in specs if isinstance(spec, Submodules)]
        if specs and len(records) == len(specs):
            return [(f"{LAYERS_PATH}.{range_label(first, last)}", records[first])
                    for first, last in layer_groups(records, spec_equal)]
    raise ValueError(f"{label} returned {kind}, not a Submodules record "
                     "(e.g. a TransformerLayerSubmodules) or a list of them, one per layer")


def run(args: argparse.Namespace) -> int:
    result = check_recipe(str(args.target), preset=str(args.preset), backend=str(args.backend))
    if result.problems:
        print(f"{result.function}: the spec is miswired:", file=sys.stderr)
        for line in result.problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"ok: {result.slots_checked} slots checked ({result.function})")
    return 0
