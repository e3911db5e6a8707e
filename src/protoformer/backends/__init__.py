"""Backends: which implementation builds each general layer kind, chosen by name.

`get_backend("local")` returns the plain-PyTorch `LocalSpecProvider`. Other backends (a fused
GPU one, a user's own) join with `register_backend(name, factory)`; the factory is called on
each `get_backend(name)`, so optional dependencies are probed only when that backend is asked for.
"""

from __future__ import annotations

from collections.abc import Callable

from protoformer.backends.base import BackendSpecProvider
from protoformer.backends.local import LocalSpecProvider

__all__ = [
    "BackendSpecProvider",
    "LocalSpecProvider",
    "available_backends",
    "get_backend",
    "register_backend",
]

BackendFactory = Callable[[], BackendSpecProvider]

_registry: dict[str, BackendFactory] = {}


def register_backend(name: str, factory: BackendFactory, *, replace: bool = False) -> None:
    """Make `get_backend(name)` return `factory()`.

    Registering the same factory twice is harmless; a different factory under a taken name
    raises `ValueError` unless `replace=True`.
    """
    if not isinstance(name, str) or not name:  # pyright: ignore[reportUnnecessaryIsInstance]  # user input
        raise ValueError(f"register_backend: name={name!r} must be a non-empty string")
    if not callable(factory):
        raise TypeError(f"register_backend({name!r}): factory {factory!r} is not callable; pass "
                        "a class or a function returning a BackendSpecProvider")
    existing = _registry.get(name)
    if existing is not None and existing is not factory and not replace:
        raise ValueError(f"a backend named {name!r} is already registered ({existing!r}); "
                         "pass replace=True to override it")
    _registry[name] = factory


def available_backends() -> list[str]:
    """The names `get_backend` accepts, sorted."""
    return sorted(_registry)


def get_backend(name: str) -> BackendSpecProvider:
    """The backend registered under `name` (`"local"` is always there)."""
    factory = _registry.get(name)
    if factory is None:
        known = ", ".join(repr(n) for n in available_backends())
        raise ValueError(f"unknown backend {name!r}; known backends: {known}. Add one with "
                         "protoformer.backends.register_backend(name, factory)")
    return factory()


def _fused_backend() -> BackendSpecProvider:
    # Imported on request: the fused module probes its optional kernels (liger, Triton).
    from protoformer.backends.fused import FusedSpecProvider

    return FusedSpecProvider()


register_backend("local", LocalSpecProvider)
register_backend("fused", _fused_backend)
