"""Runtime conformance of a builder value against a Builder protocol.

The static checkers compare a builder with its slot's protocol when the recipe is type
checked; `check_builder` makes the same comparison when the spec is *built*, so a recipe
assembled dynamically (from a config file, a registry, a notebook) fails at construction
with a message naming the slot, the builder and every mismatch, not deep inside `forward`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from inspect import Parameter

__all__ = ["SpecError", "check_builder", "describe_builder", "protocol_members"]

_POSITIONAL = (Parameter.POSITIONAL_ONLY, Parameter.POSITIONAL_OR_KEYWORD)
_BY_NAME = (Parameter.POSITIONAL_OR_KEYWORD, Parameter.KEYWORD_ONLY)


class SpecError(TypeError):
    """A spec slot holds a value that cannot build what the slot promises."""


@dataclass(frozen=True)
class _Target:
    """What a builder value calls and what it builds."""

    signature: inspect.Signature | None
    built: object  # the class (or protocol) of the built object; None when unknown
    origin: object  # the object whose source location is reported


def _as_partial(value: object) -> functools.partial[object] | None:
    """`value` as a partial of unknown result type, or None when it is not a partial."""
    if not isinstance(value, functools.partial):
        return None
    partial: functools.partial[object] = value  # pyright: ignore[reportUnknownVariableType]  # a partial of any callable
    return partial


_SHOWN = 120  # characters of a user value quoted in a message


def clip(text: str, limit: int = _SHOWN) -> str:
    """`text` cut to `limit` characters (with "..."), so a huge value cannot flood a message."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def safe_repr(value: object) -> str:
    """`repr(value)` cut to a short prefix; a `__repr__` that raises gives `<T object>`."""
    try:
        text = repr(value)
    except Exception:  # a user object's __repr__ may raise: name its type instead
        return f"<{type(value).__qualname__} object>"
    return clip(text)


def describe_builder(builder: object) -> str:
    """A short name for a builder value with its source file and line, for messages.

    Never raises: a user object whose attributes or repr raise is described by its type.
    """
    try:
        return _describe(builder, depth=0)
    except Exception:  # a hostile __getattr__/__repr__ must not replace the real error
        return f"a {type(builder).__qualname__} object"


def _describe(builder: object, *, depth: int) -> str:
    partial = _as_partial(builder)
    if partial is not None and depth < 20:
        inner = _describe(partial.func, depth=depth + 1)
        bound = [*(safe_repr(a) for a in partial.args),
                 *(f"{clip(str(k), 40)}=..." for k in partial.keywords)]
        return f"functools.partial({inner}, {', '.join(bound)})"
    name = getattr(builder, "__qualname__", None) or type(builder).__qualname__
    module = getattr(builder, "__module__", None) or type(builder).__module__
    return f"{clip(str(module))}.{clip(str(name))} ({_location(builder)})"


def _location(obj: object) -> str:
    target: type | types.FunctionType | types.MethodType = (
        obj if isinstance(obj, (type, types.FunctionType, types.MethodType)) else type(obj))
    try:
        source = inspect.getsourcefile(target)
        _, line = inspect.getsourcelines(target)
    except Exception:  # no source (builtins, REPL) or a hostile object: no location
        return "source unknown"
    return f"{source}:{line}"


def _unwrap_partial(builder: object) -> object:
    partial = _as_partial(builder)
    while partial is not None:
        builder = partial.func
        partial = _as_partial(builder)
    return builder


_END = object()
_MAX_WRAPPED = 100  # how far a `__wrapped__` chain is followed before it counts as a loop


def _has_wrapped_loop(obj: object) -> bool:
    """Whether following `__wrapped__` from `obj` never ends (`f.__wrapped__ = f`).

    `typing.get_type_hints` follows the chain without a bound and would spin forever;
    `inspect.signature` raises ValueError on such a loop instead.
    """
    seen: set[int] = set()
    current = obj
    for _ in range(_MAX_WRAPPED):
        if id(current) in seen:
            return True
        seen.add(id(current))
        current = getattr(current, "__wrapped__", _END)
        if current is _END:
            return False
    return True


def type_hints(obj: object) -> dict[str, object]:
    """`typing.get_type_hints(obj)`, or {} when the annotations cannot be evaluated.

    Annotations of user code may not resolve (names under `if TYPE_CHECKING:`) or may be
    hostile (a `__wrapped__` loop): the checks that need them are then skipped, never hung.
    """
    if _has_wrapped_loop(obj):
        return {}
    try:
        hints: dict[str, object] = typing.get_type_hints(obj)
    except Exception:  # unresolvable user annotations: nothing to compare against
        return {}
    return hints


def _return_hint(func: object) -> object:
    """The evaluated return annotation of `func`, or None when absent or unresolvable."""
    return type_hints(func).get("return")


def _built_by_class(cls: type) -> object:
    """The type a class builds: itself, unless its `__new__` is annotated to return another."""
    owner = next((k for k in cls.__mro__ if k is not object and "__new__" in vars(k)), None)
    if owner is None:
        return cls
    new: object = vars(owner)["__new__"]
    func: object = new.__func__ if isinstance(new, staticmethod) else new  # pyright: ignore[reportUnknownMemberType]  # staticmethod is generic over an unknown callable
    built = _return_hint(func)
    if not isinstance(built, type) or built is cls:
        return cls
    if getattr(built, "_is_protocol", False):
        return built  # issubclass() is refused for protocols; compare the declared interface
    return cls if issubclass(cls, built) else built


def _target(builder: object) -> _Target:
    try:
        signature: inspect.Signature | None = inspect.signature(builder)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]  # any callable; TypeError otherwise
    except (TypeError, ValueError):
        signature = None
    base = _unwrap_partial(builder)
    if isinstance(base, type):
        return _Target(signature, _built_by_class(base), base)
    if isinstance(base, (types.FunctionType, types.MethodType, types.BuiltinFunctionType)):
        return _Target(signature, _return_hint(base), base)
    call: object = inspect.getattr_static(type(base), "__call__", None)
    return _Target(signature, _return_hint(call) if call is not None else None, type(base))


def _params(signature: inspect.Signature, *, drop_self: bool) -> list[Parameter]:
    params = list(signature.parameters.values())
    if drop_self and params and params[0].kind in _POSITIONAL:
        params = params[1:]
    return params


def compare_signatures(expected: list[Parameter], actual: list[Parameter]) -> list[str]:
    """Every way a callable with `actual` parameters fails to accept calls made as `expected`.

    `expected` is the protocol's parameter list (the calls the parent makes); `actual` is the
    builder's. Positional-only parameters are passed by position, keyword-only ones by name,
    positional-or-keyword ones either way.
    """
    problems: list[str] = []
    actual_positional = [p for p in actual if p.kind in _POSITIONAL]
    actual_by_name = {p.name: p for p in actual if p.kind in _BY_NAME}
    has_var_args = any(p.kind is Parameter.VAR_POSITIONAL for p in actual)
    has_var_kwargs = any(p.kind is Parameter.VAR_KEYWORD for p in actual)
    served: set[str] = set()

    position = 0
    for param in expected:
        if param.kind is Parameter.VAR_POSITIONAL:
            if not has_var_args:
                problems.append(f"does not accept extra positional arguments (*{param.name})")
            continue
        if param.kind is Parameter.VAR_KEYWORD:
            if not has_var_kwargs:
                problems.append(f"does not accept extra keyword arguments (**{param.name})")
            continue
        optional = param.default is not Parameter.empty
        if param.kind in _POSITIONAL:
            if position < len(actual_positional):
                match = actual_positional[position]
                served.add(match.name)
                if optional and match.default is Parameter.empty:
                    problems.append(
                        f"positional parameter {position} ('{param.name}') is optional in the "
                        f"protocol but '{match.name}' has no default")
                if param.kind is Parameter.POSITIONAL_OR_KEYWORD and match.name != param.name \
                        and param.name not in actual_by_name and not has_var_kwargs:
                    problems.append(f"missing parameter '{param.name}': the protocol may pass it by name")
            elif not has_var_args:
                problems.append(
                    f"takes {len(actual_positional)} positional argument(s) but the protocol "
                    f"passes '{param.name}' at position {position}")
            position += 1
            continue
        # Keyword-only in the protocol.
        named = actual_by_name.get(param.name)
        if named is None:
            if not has_var_kwargs:
                problems.append(f"missing keyword parameter '{param.name}' (the protocol passes it by name)")
            continue
        if named.kind is Parameter.POSITIONAL_OR_KEYWORD and \
                actual_positional.index(named) < position:
            problems.append(
                f"parameter '{param.name}' is filled by position {actual_positional.index(named)} "
                "and again by name")
        served.add(named.name)
        if optional and named.default is Parameter.empty:
            problems.append(f"keyword parameter '{param.name}' is optional in the protocol "
                            "but required by the builder; give it a default")

    for param in actual:
        if param.kind in (Parameter.VAR_POSITIONAL, Parameter.VAR_KEYWORD):
            continue
        if param.default is Parameter.empty and param.name not in served:
            problems.append(f"requires parameter '{param.name}' that the protocol never passes; "
                            "give it a default or bind it with functools.partial")
    return problems


def protocol_members(protocol: type) -> dict[str, Callable[..., object]]:
    """The methods a (Interface) protocol declares, own and inherited, without dunders."""
    members: dict[str, Callable[..., object]] = {}
    for klass in reversed(protocol.__mro__):
        if klass is object or klass is typing.Generic or getattr(klass, "_is_protocol", False) is False:
            continue
        for name, value in vars(klass).items():
            if name.startswith("_") or not callable(value):
                continue
            members[name] = value
    return members


def _origin(hint: object) -> object:
    return typing.get_origin(hint) or hint


def _options(hint: object) -> tuple[object, ...]:
    """The members of a union annotation, or the annotation alone."""
    origin: object = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return typing.get_args(hint)
    return (hint,)


def _is_concrete_class(hint: object) -> bool:
    return isinstance(hint, type) and not getattr(hint, "_is_protocol", False)


def _return_mismatch(expected: object, actual: object) -> str | None:
    """A message when two return annotations obviously disagree (Tensor vs tuple), else None."""
    if expected is None or actual is None:
        return None
    expected_origins = [_origin(e) for e in _options(expected)]
    for option in _options(actual):
        got = _origin(option)
        if not isinstance(got, type) or not _is_concrete_class(got):
            return None
        if not any(
            not isinstance(e, type) or not _is_concrete_class(e) or issubclass(got, e)
            for e in expected_origins
        ):
            return f"returns {_hint_name(actual)}, the protocol expects {_hint_name(expected)}"
    return None


def _hint_name(hint: object) -> str:
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__qualname__
    return str(hint).replace("torch.Tensor", "Tensor").replace("typing.", "")


def _interface_problems(interface: type, built: object) -> list[str]:
    if not isinstance(built, type):
        return []  # unknown or unannotated: the static checkers are the only judge here
    problems: list[str] = []
    for name, proto_method in protocol_members(interface).items():
        impl = inspect.getattr_static(built, name, None)
        if impl is None or (not callable(impl) and not isinstance(impl, (staticmethod, classmethod))):
            problems.append(f"the built {built.__qualname__} has no method '{name}' "
                            f"required by {interface.__qualname__}")
            continue
        impl_func = getattr(built, name)
        try:
            expected = _params(inspect.signature(proto_method), drop_self=True)
            actual = _params(inspect.signature(impl_func), drop_self=not isinstance(impl, staticmethod))
        except (TypeError, ValueError):
            continue
        for problem in compare_signatures(expected, actual):
            problems.append(f"{built.__qualname__}.{name} {problem}")
        mismatch = _return_mismatch(_return_hint(proto_method), _return_hint(impl_func))
        if mismatch is not None:
            problems.append(f"{built.__qualname__}.{name} {mismatch}")
    return problems


_cache: dict[tuple[object, type], tuple[str, ...]] = {}


def _cache_key(builder: object) -> object:
    """What the check's outcome depends on: the builder itself, or for a partial its shape.

    Recipes build fresh `functools.partial` objects on every call, so keying partials by
    identity would recompute every rebuild. A partial's outcome depends only on the wrapped
    callable, how many positionals it binds, the names and types of the keywords it binds,
    and the values of those that are plain scalars (checked against `Literal[...]`).
    """
    bound = _as_partial(builder)
    if bound is not None:
        keywords: dict[str, object] = dict(bound.keywords)
        return ("partial", bound.func, len(bound.args),
                tuple(sorted((name, type(value), value if type(value) in _SCALARS else None)
                             for name, value in keywords.items())))
    return builder


_SCALARS = (bool, int, float, str, type(None))


def _mismatches(builder: object, protocol: type) -> tuple[str, ...]:
    try:
        key = (_cache_key(builder), protocol)
        cached = _cache.get(key)
    except Exception:  # unhashable (or hostile __hash__/__eq__) builder: check every time
        return tuple(_compute_mismatches(builder, protocol))
    if cached is None:
        cached = tuple(_compute_mismatches(builder, protocol))
        _cache[key] = cached
    return cached


def _error_text(error: BaseException) -> str:
    try:
        return str(error)
    except Exception:  # an exception whose __str__ raises
        return "(no message)"


def _is_callable(value: object) -> bool:
    try:
        return callable(value)
    except Exception:  # a hostile __class__ property: not a builder we can use
        return False


def _compute_mismatches(builder: object, protocol: type) -> list[str]:
    if not callable(builder):
        return [f"is a value of type {type(builder).__qualname__}, not a builder; a slot takes a "
                "class, function or functools.partial that builds the submodule"]
    if isinstance(builder, _module_type()):
        return ["is a module instance; a slot takes the class (or a functools.partial of it) "
                "and the parent builds the module"]
    call = _protocol_call(protocol)
    assert call is not None, "check_builder tests the protocol first"
    target = _target(builder)
    problems: list[str] = []
    if target.signature is None:
        return _unbindable_partial_problems(builder) or ["has no inspectable signature"]
    expected = _params(inspect.signature(call), drop_self=True)
    problems.extend(compare_signatures(expected, list(target.signature.parameters.values())))
    problems.extend(_bound_keyword_problems(builder))
    interface = _return_hint(call)
    if isinstance(interface, type) and getattr(interface, "_is_protocol", False):
        problems.extend(_interface_problems(interface, target.built))
    return problems


def _unbindable_partial_problems(builder: object) -> list[str]:
    """Why a partial cannot bind its arguments to the callable it wraps (unknown keywords,
    too many positionals); empty when that is not the reason."""
    bound = _as_partial(builder)
    if bound is None:
        return []
    try:
        params = list(inspect.signature(bound.func).parameters.values())
    except (TypeError, ValueError):
        return []
    if any(p.kind is Parameter.VAR_KEYWORD for p in params):
        accepted_names = None
    else:
        accepted_names = {p.name for p in params if p.kind in _BY_NAME}
    name = getattr(bound.func, "__qualname__", type(bound.func).__qualname__)
    problems = [f"binds keyword '{keyword}' that {name} does not accept"
                for keyword in bound.keywords
                if accepted_names is not None and keyword not in accepted_names]
    positional = [p for p in params if p.kind in _POSITIONAL]
    if len(bound.args) > len(positional) and not any(
            p.kind is Parameter.VAR_POSITIONAL for p in params):
        problems.append(f"binds {len(bound.args)} positional argument(s) but {name} takes "
                        f"{len(positional)}")
    return problems


def _bound_keyword_problems(builder: object) -> list[str]:
    """Keywords bound by a partial whose value does not fit the annotation the builder declares.

    Checked where an `isinstance`-like test is exact: dataclass records (such as a
    `submodules=` Submodules record), enums, and the simple annotations `int`, `float`,
    `str`, `bool`, `None`, `Literal[...]` and unions of them, judged as pyright judges them
    (a `bool` is an `int`, an `int` is a `float`; `Literal[1]` takes `1`, not `True`). Other
    annotations (callables, tensors, generics) are left to the static checkers.
    """
    bound = _as_partial(builder)
    if bound is None:
        return []
    base = _unwrap_partial(bound)
    func: object = getattr(base, "__init__") if isinstance(base, type) else base  # noqa: B009 - mypy rejects .__init__ on an instance
    hints = type_hints(func)
    problems: list[str] = []
    keywords: dict[str, object] = dict(bound.keywords)
    for name, value in keywords.items():
        hint = hints.get(name)
        if hint is None:
            continue
        accepts = [_accepts(option, value) for option in _options(hint)]
        if None in accepts or any(accepts):
            continue  # an option we do not judge, or one that takes the value
        given = (f"{name}={safe_repr(value)} (a {type(value).__qualname__})"
                 if type(value) in _SCALARS else f"{name}= to a {type(value).__qualname__}")
        problems.append(f"binds {given}, but the builder declares {name}: "
                        f"{clip(_hint_name(hint))}")
    return problems


def _accepts(option: object, value: object) -> bool | None:
    """Whether a value fits one member of a union annotation; None when we do not judge it."""
    if option is type(None) or option is None:
        return value is None
    if typing.get_origin(option) is typing.Literal:
        return any(type(value) is type(allowed) and value == allowed
                   for allowed in typing.get_args(option))
    if option is float:  # pyright's promotion: an int (so a bool) is a float too
        return isinstance(value, (int, float))
    simple = next((kind for kind in (int, str, bool) if option is kind), None)
    if simple is not None:
        return isinstance(value, simple)
    if isinstance(option, type) and (dataclasses.is_dataclass(option) or issubclass(option, enum.Enum)):
        return isinstance(value, option)
    return None


def _protocol_call(protocol: type) -> Callable[..., object] | None:
    for klass in protocol.__mro__:
        if getattr(klass, "_is_protocol", False) and "__call__" in vars(klass):
            call: Callable[..., object] = vars(klass)["__call__"]
            return call
    return None


def _module_type() -> type:
    from torch import nn  # imported lazily: the spec core itself does not need torch

    return nn.Module


def check_builder(builder: object, protocol: type, *, slot: str | None = None) -> None:
    """Raise `SpecError` unless `builder` can be called as `protocol.__call__` and builds its interface.

    `builder` is a class (checked through its `__init__`, or its `__new__` when that builds
    another type), a function, a `functools.partial` (nested partials too) or a callable
    instance. Every mismatch is reported, each on its own line; results are cached per
    (builder, protocol).
    """
    if _protocol_call(protocol) is None:
        raise TypeError(f"{protocol.__qualname__} is not a Builder protocol: it has no __call__")
    where = f"{slot}: " if slot else ""
    try:
        problems = _mismatches(builder, protocol)
    except Exception as error:  # user code ran (a property, __getattr__, __signature__...)
        raise SpecError(
            f"{where}{describe_builder(builder)} cannot be checked against "
            f"{protocol.__qualname__}: inspecting it raised {type(error).__name__}: "
            f"{clip(_error_text(error))}; a builder must be a class, function or "
            "functools.partial whose signature and annotations can be read") from error
    if not problems:
        return
    shown = describe_builder(builder) if _is_callable(builder) else safe_repr(builder)
    lines = "\n".join(f"  - {p}" for p in problems)
    raise SpecError(f"{where}{shown} does not satisfy {protocol.__qualname__}:\n{lines}")
