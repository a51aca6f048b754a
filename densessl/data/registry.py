"""Registries for data sources, dataset synthesizers and inspectors.

* ``register_source("name")``: a Dataset class usable as ``data.source: name`` in recipes; its
  constructor keywords come from ``data.options`` (plus ``path``, ``image_size``, ``channels``,
  ``seed`` from the ``data`` section when it accepts them).
* ``register_synthesizer("kind")``: ``fn(out: Path, n: int | None, seed: int) -> Path`` behind
  ``densessl data synth KIND --out DIR``; writes a synthetic dataset in a real on-disk format.
* ``register_inspector("format")``: ``fn(root: Path) -> dict`` behind
  ``densessl data inspect ROOT --format FORMAT``.
* ``register_provenance_lister("format")``: ``fn(root: Path) -> (files, items)`` behind
  ``densessl data inspect ROOT --format FORMAT --manifest M``.
"""

from __future__ import annotations

from collections.abc import Callable

SOURCES: dict[str, type] = {}
SYNTHESIZERS: dict[str, Callable] = {}
INSPECTORS: dict[str, Callable] = {}
#: format → ``fn(root: Path) -> (files, items)``: the images a source of that format reads,
#: relative to ``root``, and the files each item reads together (``data inspect --manifest``)
PROVENANCE_LISTERS: dict[str, Callable] = {}


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


def register_provenance_lister(name: str):
    return registrar(PROVENANCE_LISTERS, "provenance lister", name)
