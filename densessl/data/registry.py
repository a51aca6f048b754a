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
* ``register_checker("format")``: ``fn(root: Path, options: dict) -> list[str]`` behind
  ``densessl data inspect ROOT --format FORMAT --check``: what the format's own loader refuses
  (one line per problem, naming the file), found by the loader's own checks.
"""

from __future__ import annotations

from collections.abc import Callable

SOURCES: dict[str, type] = {}
SYNTHESIZERS: dict[str, Callable] = {}
INSPECTORS: dict[str, Callable] = {}
#: format → ``fn(root: Path) -> (files, items)``: the images a source of that format reads,
#: relative to ``root``, and the files each item reads together (``data inspect --manifest``)
PROVENANCE_LISTERS: dict[str, Callable] = {}
#: format → ``fn(root: Path, options: dict) -> list[str]``: the problems the format's loader
#: (pretraining source or fine-tuning dataset) refuses, for ``data inspect --check``
CHECKERS: dict[str, Callable] = {}


def registrar(table: dict, kind: str, name: str):
    """A decorator that files an object under ``name`` in ``table`` (a name taken by another
    object is an error)."""
    def decorator(obj):
        if name in table and table[name] is not obj:
            held = table[name]
            holder = f"{getattr(held, '__module__', '?')}.{getattr(held, '__qualname__', held)}"
            raise ValueError(f"{kind} name {name!r} is already registered by {holder}")
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


def register_checker(name: str):
    return registrar(CHECKERS, "checker", name)
