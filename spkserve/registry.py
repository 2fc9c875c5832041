"""Registry of architectures a bundle can name.

An architecture spec is plain JSON: ``{"name": "<registered name>", "params": {...}}``.
:func:`build` looks the name up and calls the registered builder with the params;
builders of composite models call :func:`build` on nested specs.

User packages register architectures either by calling :func:`register`
(e.g. at import time of their package) or through the entry-point group
``spkserve.architectures`` in their ``pyproject.toml``::

    [project.entry-points."spkserve.architectures"]
    my_model = "my_package.models:build_my_model"

Entry points are loaded lazily, only when a bundle names an unknown architecture.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, Callable

from torch import nn

ENTRY_POINT_GROUP = "spkserve.architectures"

Builder = Callable[..., nn.Module]

#: name -> builder(**params) -> nn.Module
ARCHITECTURES: dict[str, Builder] = {}

# modules that register the built-in architectures when imported
_BUILTIN_MODULES = ("spkserve.potentials", "spkserve.nn.models")


class UnknownArchitectureError(KeyError):
    """A spec names an architecture that no installed package registers."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder`` under ``name`` (a name may be registered once)."""

    def deco(builder: Builder) -> Builder:
        if name in ARCHITECTURES and ARCHITECTURES[name] is not builder:
            raise ValueError(f"architecture {name!r} is already registered by {ARCHITECTURES[name]!r}")
        ARCHITECTURES[name] = builder
        return builder

    return deco


def _load_builtins() -> None:
    for mod in _BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:  # a built-in module not written yet
            if err.name != mod:
                raise


def _load_entry_point(name: str) -> bool:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            builder = ep.load()
            ARCHITECTURES.setdefault(name, builder)
            return True
    return False


def get_builder(name: str) -> Builder:
    """Return the builder registered under ``name``, loading plugins if needed."""
    if name not in ARCHITECTURES:
        _load_builtins()
    if name not in ARCHITECTURES and not _load_entry_point(name):
        known = ", ".join(sorted(ARCHITECTURES)) or "none"
        raise UnknownArchitectureError(
            f"unknown architecture {name!r}: no installed package registers it "
            f"(known: {known}; plugins register through the entry-point group {ENTRY_POINT_GROUP!r})"
        )
    return ARCHITECTURES[name]


def build(spec: dict[str, Any]) -> nn.Module:
    """Build a module from ``{"name": ..., "params": {...}}``."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"an architecture spec must be a dict with a 'name' key, got {spec!r}")
    params = spec.get("params", {}) or {}
    builder = get_builder(spec["name"])
    try:
        module = builder(**params)
    except TypeError as err:
        raise ValueError(f"architecture {spec['name']!r} cannot be built from params {sorted(params)}: {err}") from err
    module.architecture_spec = {"name": spec["name"], "params": params}
    return module


def available() -> list[str]:
    """Names of all registered architectures (built-in and plugins)."""
    _load_builtins()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ARCHITECTURES.setdefault(ep.name, ep.load())
    return sorted(ARCHITECTURES)
