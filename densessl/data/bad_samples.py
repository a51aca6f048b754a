"""Bad samples (missing files, unreadable images, inconsistent labels): an error by default, or
with ``data.skip_bad`` a warning plus an entry in the dataset's ``skipped_samples``, which
pretraining copies into metrics.json. Never silent."""

from __future__ import annotations

import warnings

from densessl.errors import DataError


def report_bad(problem: str, skip_bad: bool, skipped: list[str]) -> None:
    """A :class:`DataError`, or with ``skip_bad`` a warning plus an entry in ``skipped``."""
    if not skip_bad:
        raise DataError(problem)
    warnings.warn(f"skipping: {problem}", stacklevel=3)
    skipped.append(problem)


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
