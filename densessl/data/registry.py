"""Registries for data sources, dataset synthesizers and inspectors.

* ``register_source("name")``: a Dataset class usable as ``data.source: name`` in recipes; its
  constructor keywords come from ``data.options`` (plus ``path``, ``image_size``, ``channels``,
  ``seed`` from the ``data`` section when it accepts them).
* ``register_synthesizer("kind")``: ``fn(out: Path, n: int | None, seed: int) -> Path`` behind
  ``densessl data synth KIND --out DIR``; writes a synthetic dataset in a real on-disk format.
* ``register_inspector("format")``: ``fn(root: Path) -> dict`` behind
  ``densessl data inspect ROOT --format FORMAT``.
"""

from __future__ import annotations

from collections.abc import Callable

SOURCES: dict[str, type] = {}
SYNTHESIZERS: dict[str, Callable] = {}
INSPECTORS: dict[str, Callable] = {}


def registrar(table: dict, kind: str, name: str):
    """A decorator that files an object under ``name`` in ``table`` (a name taken by another
    object is an error)."""
    def decorator(obj):
        if name in table and table[name] is not obj:
            raise ValueError(f"{kind} {name!r} is already registered")
        table[name] = obj
        return obj

    return decorator


def register_source(name: str):
    return registrar(SOURCES, "data source", name)


def register_synthesizer(name: str):
    return registrar(SYNTHESIZERS, "synthesizer", name)


def register_inspector(name: str):
    return registrar(INSPECTORS, "inspector", name)
