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
