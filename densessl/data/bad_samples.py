"""Bad samples (missing files, unreadable images, inconsistent labels): an error by default, or
with ``data.skip_bad`` a warning plus an entry in the dataset's ``skipped_samples``, which
pretraining copies into metrics.json. Never silent."""

from __future__ import annotations

import warnings
from collections.abc import Callable

from densessl.errors import DataError


def report_bad(problem: str, skip_bad: bool, skipped: list[str]) -> None:
    """A :class:`DataError`, or with ``skip_bad`` a warning plus an entry in ``skipped``."""
    if not skip_bad:
        raise DataError(problem)
    warnings.warn(f"skipping: {problem}", stacklevel=3)
    skipped.append(problem)


def refusals(build: Callable[[], object]) -> list[str]:
    """What a loader refuses, found by the loader's own checks (``data inspect --check``):
    ``build()`` constructs it with ``skip_bad=True``, so each bad sample it meets is a
    ``skipping: ...`` warning (:func:`report_bad`) instead of the first error; each is listed,
    then the :class:`DataError` that stopped the construction, if any. Without
    ``data.skip_bad`` a run refuses every one of them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            build()
            fatal = []
        except DataError as exc:
            fatal = [str(exc)]
    skipped = [str(w.message).removeprefix("skipping: ") for w in caught
               if str(w.message).startswith("skipping: ")]
    return list(dict.fromkeys(skipped + fatal))


def loader_refusals(factory: Callable, root, options: dict, defaults: dict | None = None
                    ) -> tuple[list[str], object | None]:
    """:func:`refusals` of ``factory`` (a registered source or labeled dataset) built on
    ``root`` with ``options`` (``data inspect --option``; unknown keys are a RecipeError, as in a
    recipe) over ``defaults``; also the built object, or ``None`` when it was refused whole."""
    from densessl.options import construct  # lazy: this module stays light

    for key in ("path", "skip_bad"):
        if key in options:
            raise DataError(f"data inspect --option {key}: set by --check itself (path: ROOT; "
                            "skip_bad: on, so that every bad sample is listed as a refusal)")
    built: list = []
    fixed = {**(defaults or {}), "path": str(root), "skip_bad": True}
    problems = refusals(lambda: built.append(
        construct(factory, options, "data inspect: option", fixed)))
    return problems, (built[0] if built else None)


class ReadSkips:
    """Items skipped when they were read (a truncated file whose header was sound, a raster
    window below ``min_valid``), with ``data.skip_bad``. Reads happen in DataLoader workers, so
    the per-item flags live in shared memory: the main process counts what every worker
    skipped (:func:`count_read_skips`), and a worker never retries an item another one found
    bad. Allocate in the main process, before the workers start."""

    def __init__(self, n: int) -> None:
        import torch  # lazy: the data layer's light modules stay importable without it

        self.flags = torch.zeros(max(n, 0), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return int(self.flags.sum())

    def first_readable(self, index: int, read, skip_bad: bool, what: str):
        """``read(index)``, or with ``skip_bad`` the next item (cyclically) that reads without
        a :class:`DataError`; each bad item is warned about and flagged once."""
        n = len(self.flags)
        for attempt in range(n):
            j = (index + attempt) % n
            if self.flags[j]:
                continue
            try:
                return read(j)
            except DataError as exc:
                if not skip_bad:
                    raise
                if not self.flags[j]:
                    self.flags[j] = True
                    warnings.warn(f"skipping: {exc}", stacklevel=2)
        raise DataError(f"{what}: every sample is unreadable or invalid "
                        f"({len(self)} skipped with data.skip_bad)")


def count_read_skips(root) -> int:
    """Items skipped while reading, over ``root`` and everything it wraps."""
    from densessl.data.wrapped import wrapped_objects

    seen: set[int] = set()
    total = 0
    for obj in wrapped_objects(root):
        skips = getattr(obj, "read_skips", None)
        if isinstance(skips, ReadSkips) and id(skips) not in seen:
            seen.add(id(skips))
            total += len(skips)
    return total
