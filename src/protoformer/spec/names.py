"""Naming classes and functions as "package.module:QualName", and resolving names safely.

Resolving a name imports a module, so `resolve_reference` only imports modules under an
allowlist of prefixes and checks the whole name *before* anything is imported: a prefix
"protoformer." (or "protoformer") allows the package "protoformer" and every module below
it, never "protoformerx". Private and dunder names, traversal through a module attribute, and
objects defined in a module outside the allowlist (a re-export such as `run = os.system`) are
refused too. Every failure is a `SpecError`.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Sequence

from protoformer.spec.check import SpecError, clip, safe_repr

__all__ = [
    "DEFAULT_ALLOW",
    "is_named_builder",
    "normalize_allow",
    "reference_of",
    "resolve_builder",
    "resolve_reference",
]

DEFAULT_ALLOW: tuple[str, ...] = ("protoformer.",)
"""Module prefixes names may be resolved from unless told otherwise: protoformer itself."""


MAX_NAME_LENGTH = 1000
"""Longest "module:QualName" accepted; longer text is refused before it is looked at."""


def where(path: str) -> str:
    """The "slot.path: " that starts an error message about that place in a spec."""
    return f"{clip(path, 200)}: " if path else "spec root: "


def join_path(path: str, name: str) -> str:
    """`path.name`, or `name` at the root."""
    return f"{path}.{name}" if path else name


def short_repr(value: object) -> str:
    """`repr(value)`, cut to 120 characters for messages."""
    return safe_repr(value)


def is_named_builder(value: object) -> bool:
    """Whether `value` is a class or a plain (not bound) function: what a name can stand for."""
    if isinstance(value, type) or isinstance(value, types.FunctionType):
        return True
    if isinstance(value, types.BuiltinFunctionType):  # C functions; `[].append` is bound: refused
        owner = getattr(value, "__self__", None)
        return owner is None or isinstance(owner, types.ModuleType)
    return False


def is_identifier(text: str) -> bool:
    """Whether `text` is an ASCII Python identifier (no look-alike Unicode letters)."""
    return text.isascii() and text.isidentifier()


def _name_problem(module: str, names: Sequence[str]) -> str | None:
    """Why "module:names" is not an acceptable name, or None."""
    for part in module.split("."):
        if not is_identifier(part) or part.startswith("__"):
            return f"module path '{clip(module)}' is not a dotted sequence of (non-dunder) identifiers"
    if not names:
        return "the name after ':' is empty"
    for name in names:
        if not is_identifier(name):
            return f"'{clip(name)}' is not an identifier"
        if name.startswith("_"):
            return f"'{clip(name)}' is private or a dunder name; only public names can be resolved"
    return None


def reference_of(obj: object, *, path: str = "") -> str:
    """The "module:QualName" of a class or function that `resolve_reference` finds again.

    Raises `SpecError` (naming `path`) for anything else: a lambda, a class or function
    defined inside a function, a bound method, a private name, an instance.
    """
    if not is_named_builder(obj):
        raise SpecError(
            f"{where(path)}{short_repr(obj)} (a {type(obj).__qualname__}) cannot be "
            "written to a spec file: only classes, module-level functions, functools.partial of "
            "them, Submodules records and plain values (JSON values, enums, dtypes, tuples) can")
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        raise SpecError(f"{where(path)}{short_repr(obj)} has no __module__/__qualname__ "
                        "to name it by")
    if "<" in qualname:
        raise SpecError(
            f"{where(path)}{module}.{qualname} is a lambda or is defined inside a function, "
            "so it cannot be imported by name; define it at module level")
    names = qualname.split(".")
    problem = _name_problem(module, names)
    if problem is not None:
        raise SpecError(f"{where(path)}{module}:{qualname} cannot be named in a spec file: "
                        f"{problem}")
    found: object = sys.modules.get(module)
    for name in names:
        found = getattr(found, name, None)
    if found is not obj:
        raise SpecError(f"{where(path)}{short_repr(obj)} is not found again as "
                        f"{module}:{qualname} (it was replaced or renamed after definition); "
                        "name a module-level object")
    return f"{module}:{qualname}"


def normalize_allow(allow: Sequence[str]) -> tuple[str, ...]:
    """The allowed prefixes without trailing dots; `SpecError` for a malformed one."""
    if isinstance(allow, str):
        raise SpecError(f"allow={allow!r} is a single string; pass a tuple of module prefixes, "
                        f"e.g. allow=({allow!r},)")
    prefixes: list[str] = []
    for prefix in allow:
        is_text = isinstance(prefix, str)  # pyright: ignore[reportUnnecessaryIsInstance]  # user input
        base = prefix.rstrip(".") if is_text else ""
        if not base or any(not is_identifier(part) for part in base.split(".")):
            raise SpecError(f"allowed module prefix {prefix!r} is not a dotted module path such "
                            "as 'protoformer.' or 'my_project.layers'")
        prefixes.append(base)
    return tuple(prefixes)


def _is_allowed(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == base or module.startswith(base + ".") for base in prefixes)


def _refusal(text: str, module: str, prefixes: tuple[str, ...], path: str, *,
             imported: bool) -> SpecError:
    shown = ", ".join(repr(p + ".") for p in prefixes) or "(none)"
    module = clip(module)
    subject = (f"it is defined in module {module!r}, which is" if imported
               else f"module {module!r} is")
    done = "" if imported else " Nothing was imported."
    return SpecError(
        f"{where(path)}'{clip(text)}' is refused: {subject} outside the allowed module prefixes "
        f"({shown}).{done} If you trust it, allow it: allow=(..., {module!r}) "
        f"(CLI: --allow {module})")


def resolve_reference(text: object, *, allow: Sequence[str] = DEFAULT_ALLOW,
                      path: str = "") -> object:
    """The object that "package.module:QualName" names, importing only allowed modules.

    The string is checked first (syntax, public names, module under an allowed prefix); only
    then is the module imported. Attribute traversal goes through classes only, and the
    object found must be defined in an allowed module. Any failure raises `SpecError`.
    """
    prefixes = normalize_allow(allow)
    if not isinstance(text, str):
        raise SpecError(f"{where(path)}expected a name 'package.module:Name', got "
                        f"{short_repr(text)}")
    if len(text) > MAX_NAME_LENGTH:
        raise SpecError(f"{where(path)}'{clip(text)}' ({len(text)} characters) is not a name "
                        f"'package.module:Name': names are at most {MAX_NAME_LENGTH} characters")
    shown = clip(text)
    module, sep, qualname = text.partition(":")
    names = qualname.split(".") if qualname else []
    problem = "there is no ':' between module and name" if not sep else _name_problem(module, names)
    if problem is not None:
        raise SpecError(f"{where(path)}'{shown}' is not a valid name 'package.module:Name': "
                        f"{problem}")
    if not _is_allowed(module, prefixes):
        raise _refusal(text, module, prefixes, path, imported=False)
    try:
        found: object = importlib.import_module(module)
    except Exception as error:  # an allowed module that fails to import is a bad spec
        raise SpecError(f"{where(path)}'{shown}': cannot import {clip(module)!r}: "
                        f"{type(error).__name__}: {error}") from error
    for index, name in enumerate(names):
        if index > 0 and not isinstance(found, type):
            raise SpecError(f"{where(path)}'{shown}': '{'.'.join(names[:index])}' is not a "
                            "class; a name may only reach through classes")
        try:
            found = getattr(found, name)
        except AttributeError:
            owner = f"{module}:{'.'.join(names[:index])}" if index else f"module {clip(module)!r}"
            raise SpecError(f"{where(path)}'{shown}': {owner} has no attribute "
                            f"'{name}'") from None
        except Exception as error:
            raise SpecError(f"{where(path)}'{shown}': looking up '{name}' failed: "
                            f"{type(error).__name__}: {error}") from error
    if isinstance(found, types.ModuleType):
        raise SpecError(f"{where(path)}'{shown}' names a module; name a class or "
                        "function in it")
    home = getattr(found, "__module__", None)
    if is_named_builder(found) and (not isinstance(home, str) or not _is_allowed(home, prefixes)):
        raise _refusal(text, str(home), prefixes, path, imported=True)
    return found


def resolve_builder(text: object, *, allow: Sequence[str] = DEFAULT_ALLOW,
                    path: str = "") -> object:
    """`resolve_reference`, requiring a class or function (what a builder slot holds)."""
    found = resolve_reference(text, allow=allow, path=path)
    if not is_named_builder(found):
        raise SpecError(f"{where(path)}'{clip(str(text))}' is a {type(found).__qualname__}, not a class "
                        "or function")
    return found
