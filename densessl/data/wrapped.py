"""Walk what a pair builder wraps (its datasets, sources, backgrounds, …) to collect what they
expose (dataset cards, skipped samples, per-image provenance) without each caller knowing the
wrapping."""

from __future__ import annotations

from collections.abc import Iterator

#: attributes through which builders and datasets hold the objects they wrap
WRAPPING_ATTRIBUTES = ("dataset", "datasets", "source", "base", "builder", "backgrounds",
                       "segments")


def wrapped_objects(root) -> Iterator[object]:
    """``root`` and every object it wraps, each once (depth first)."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        yield obj
        for name in WRAPPING_ATTRIBUTES:
            child = getattr(obj, name, None)
            stack.extend(child if isinstance(child, (list, tuple)) else [child])
