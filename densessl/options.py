"""Recipe options → a constructor call, with unknown keys reported as recipe errors.

Shared by every registry that recipes fill from a free-form ``options`` mapping: data sources,
pair builders (``densessl.build``) and labeled downstream datasets (``densessl.eval``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from densessl.errors import RecipeError


def construct(factory: Callable, options: dict, where: str, defaults: dict | None = None,
              label: str | None = None):
    """``factory(**options)`` (a class or a function); an unknown key is a RecipeError naming
    ``where.KEY`` and the valid keys. ``defaults`` are passed only for the keywords the factory
    accepts and the options do not set. ``label`` names the factory in errors."""
    label = label or getattr(factory, "__name__", repr(factory))
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    accepted = [k for k, p in params.items()
                if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    for key in options:
        if key not in params and not takes_any:
            raise RecipeError(f"{where}.{key}: not an option of {label} "
                              f"(valid: {', '.join(accepted) or 'none'})")
    kwargs = {k: v for k, v in (defaults or {}).items() if k in params and k not in options}
    kwargs.update(options)
    try:
        return factory(**kwargs)
    except (TypeError, ValueError) as exc:  # a bad option value (e.g. num_images: 0) too
        raise RecipeError(f"{where}: cannot build {label}: {exc}") from None
