"""Name → pair builder registry, so recipes can say ``pairs.builder: same_image`` or
``pairs.builder: mypackage.module:MyBuilder``."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from densessl.errors import RecipeError

_BUILDERS: dict[str, type] = {}


def register_pair_builder(name: str) -> Callable[[type], type]:
    """Class decorator: make a :class:`~densessl.pairs.base.PairBuilder` available by name."""

    def decorator(cls: type) -> type:
        if name in _BUILDERS and _BUILDERS[name] is not cls:
            raise ValueError(f"pair builder name {name!r} is already registered by "
                             f"{_BUILDERS[name].__module__}.{_BUILDERS[name].__qualname__}")
        _BUILDERS[name] = cls
        cls.name = name
        return cls

    return decorator


def available_pair_builders() -> list[str]:
    return sorted(_BUILDERS)


def get_pair_builder(name: str) -> type:
    """Look a builder up by registered name or by import path ``package.module:Class``."""
    if name in _BUILDERS:
        return _BUILDERS[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise RecipeError(f"pairs.builder: cannot import module {module_name!r} ({exc})") \
                from exc
        if not hasattr(module, attr):
            raise RecipeError(f"pairs.builder: module {module_name!r} has no {attr!r}")
        return getattr(module, attr)
    raise RecipeError(f"pairs.builder: unknown builder {name!r}; registered builders: "
                      f"{', '.join(available_pair_builders())} (or give 'package.module:Class')")
