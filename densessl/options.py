"""Recipe options → a constructor call, with unknown keys and wrongly typed values reported as
recipe errors.

Shared by every registry that recipes fill from a free-form ``options`` mapping: data sources,
pair builders (``densessl.build``) and labeled downstream datasets (``densessl.eval``).
"""

from __future__ import annotations

import collections.abc as cabc
import inspect
import os
import types
import typing
from collections.abc import Callable
from pathlib import PurePath

from densessl.errors import RecipeError

_SEQUENCES = (list, tuple, set, frozenset, cabc.Sequence, cabc.MutableSequence, cabc.Iterable,
              cabc.Collection, cabc.Set, cabc.MutableSet)
_MAPPINGS = (dict, cabc.Mapping, cabc.MutableMapping)


def construct(factory: Callable, options: dict, where: str, defaults: dict | None = None,
              label: str | None = None):
    """``factory(**options)`` (a class or a function); an unknown key is a RecipeError naming
    ``where.KEY`` and the valid keys, and so is a value that does not match the keyword's type
    annotation (:func:`check_option_types`). ``defaults`` are passed only for the keywords the
    factory accepts and the options do not set. ``label`` names the factory in errors."""
    label = label or getattr(factory, "__name__", repr(factory))
    check_options(factory, options, where, label)
    params = inspect.signature(factory).parameters
    kwargs = {k: v for k, v in (defaults or {}).items() if k in params and k not in options}
    kwargs.update(options)
    try:
        return factory(**kwargs)
    except (TypeError, ValueError) as exc:  # a bad option value (e.g. num_images: 0) too
        raise RecipeError(f"{where}: cannot build {label}: {exc}") from None


def check_options(factory: Callable, options: dict, where: str, label: str | None = None
                  ) -> None:
    """What :func:`construct` checks before it calls ``factory``, without calling it (nothing
    is read): every key of ``options`` is a keyword of ``factory`` (a RecipeError ``where.KEY:
    not an option of LABEL (valid: ...)``) and every value matches its annotation
    (:func:`check_option_types`). Recipe validation runs it before any data are read."""
    label = label or getattr(factory, "__name__", repr(factory))
    if not isinstance(options, dict):
        raise RecipeError(f"{where}: expected a mapping of {label}'s options, got "
                          f"{options!r}")
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    accepted = [k for k, p in params.items()
                if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    for key in options:
        if key not in params and not takes_any:
            raise RecipeError(f"{where}.{key}: not an option of {label} "
                              f"(valid: {', '.join(accepted) or 'none'})")
    check_option_types(factory, options, where, label)


def check_option_types(factory: Callable, options: dict, where: str, label: str) -> None:
    """Each option's value against ``factory``'s annotation of that keyword: a RecipeError
    ``where.KEY: expected TYPE for LABEL, got VALUE``. Values come from YAML, so a list stands
    for a tuple or any sequence, an int for a float; a bool is not an int. Keywords without an
    annotation (or with one that cannot be resolved) are not checked."""
    hints = _type_hints(factory)
    for key, value in options.items():
        if key in hints and not matches(value, hints[key]):
            raise RecipeError(f"{where}.{key}: expected {type_name(hints[key])} for {label}, "
                              f"got {value!r} ({type(value).__name__})")


def _type_hints(factory: Callable) -> dict:
    fn = factory.__init__ if inspect.isclass(factory) else factory
    try:
        return typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 — one unresolvable annotation: resolve the others alone
        hints = {}
        namespace = getattr(fn, "__globals__", {})
        for name, ann in getattr(fn, "__annotations__", {}).items():
            try:
                hints[name] = eval(ann, namespace) if isinstance(ann, str) else ann  # noqa: S307
            except Exception:  # noqa: BLE001 — e.g. a TYPE_CHECKING-only import
                continue
        return hints


def matches(value, tp) -> bool:
    """Whether a recipe (YAML) value fits the annotation ``tp``."""
    if tp is typing.Any or tp is object or isinstance(tp, typing.TypeVar):
        return True
    if tp is None or tp is type(None):
        return value is None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        return any(matches(value, a) for a in args)
    if origin is typing.Literal:
        # 1 == True in Python: a Literal[1] must not take true, nor Literal[True] take 1
        return any(value == a and type(value) is type(a) for a in args)
    if origin is typing.Annotated:
        return matches(value, args[0])
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp in (PurePath, os.PathLike) or (isinstance(tp, type) and issubclass(tp, PurePath)):
        return isinstance(value, (str, PurePath))
    base = origin or tp
    if base in _MAPPINGS:
        if not isinstance(value, cabc.Mapping):
            return False
        if len(args) == 2:
            return all(matches(k, args[0]) and matches(v, args[1]) for k, v in value.items())
        return True
    if base in _SEQUENCES:
        # YAML has lists only: a list stands for a tuple or a set; a string is not a sequence
        # of options here (``classes: "3"`` is a mistake, not ["3"])
        if not isinstance(value, (list, tuple, set, frozenset)):
            return False
        if base is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args))
        return not args or all(matches(v, args[0]) for v in value)
    if base is cabc.Callable or tp is typing.Callable:
        return callable(value)
    if isinstance(base, type):
        return isinstance(value, base)
    return True  # an annotation this checker does not know: leave it to the factory


def type_name(tp) -> str:
    """``tp`` as a reader writes it: ``int``, ``float | None``, ``'segloc' | 'insloc'``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None) or tp is None:
        return "null"
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        if name in ("Sequence", "tuple", "list", "Iterable", "Collection", "set", "frozenset"):
            name = "list"  # what a recipe writes
        return f"{name}[{', '.join('...' if a is Ellipsis else type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))
