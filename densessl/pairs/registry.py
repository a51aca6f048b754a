"""Name → pair builder registry, so recipes can say ``pairs.builder: same_image`` or
``pairs.builder: mypackage.module:MyBuilder``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from densessl.data.registry import registrar
from densessl.errors import RecipeError

_BUILDERS: dict[str, type] = {}


def register_pair_builder(name: str) -> Callable[[type], type]:
    """Class decorator: make a :class:`~densessl.pairs.base.PairBuilder` available by name."""

    file_under_name = registrar(_BUILDERS, "pair builder", name)

    def decorator(cls: type) -> type:
        file_under_name(cls)
        cls.name = name
        return cls

    return decorator


def available_pair_builders() -> list[str]:
    return sorted(_BUILDERS)


def get_pair_builder(name: str) -> type:
    """Look a builder up by registered name, by import path ``package.module:Class`` or by file
    ``path/to/file.py:Class`` (relative to the working directory)."""
    if name in _BUILDERS:
        return _BUILDERS[name]
    file_part, _, attr = name.rpartition(":")
    if file_part.endswith(".py"):
        return _load_from_file(Path(file_part), attr)
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


def _load_from_file(path: Path, attr: str) -> type:
    if not path.is_file():
        raise RecipeError(f"pairs.builder: file {str(path)!r} not found")
    module_name = f"densessl_user_{path.resolve().stem}_{abs(hash(str(path.resolve())))}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # DataLoader workers and pickling find it again
        spec.loader.exec_module(module)
    module = sys.modules[module_name]
    if not hasattr(module, attr):
        raise RecipeError(f"pairs.builder: {str(path)!r} has no {attr!r}")
    return getattr(module, attr)
