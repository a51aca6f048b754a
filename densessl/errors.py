"""User-facing errors: the CLI prints them as one line, without a traceback."""

from __future__ import annotations

import errno
import os
from pathlib import Path


class DensesslError(Exception):
    """A problem with the user's input (recipe, data, files), not a bug in densessl."""


class RecipeError(DensesslError):
    """An invalid recipe key, type or value."""


class DataError(DensesslError):
    """Missing or malformed data on disk."""


class PairContractError(DensesslError):
    """A pair builder returned something that breaks the PairSample contract."""


class OutputError(DensesslError):
    """A file could not be written: permission denied, a file or folder in the way, a
    read-only file system, a full disk or quota. Raised from the ``OSError`` (its cause)."""


# errno values that mean "this output cannot be written here", a problem with the place the
# user chose (or its disk), not a bug: the CLI reports them as one line
WRITE_ERRNOS = frozenset({
    errno.EACCES, errno.EPERM,  # permission denied
    errno.EEXIST, errno.ENOTDIR, errno.EISDIR,  # a file where a folder goes, or the reverse
    errno.EROFS,  # read-only file system
    errno.ENOSPC, errno.EDQUOT, errno.EFBIG,  # disk full, quota exceeded, file too large
})


# of those, the ones only a write meets (a read can meet EACCES, EPERM, ENOTDIR and EISDIR)
ONLY_WRITE_ERRNOS = frozenset({errno.EEXIST, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                               errno.EFBIG})


def _in_the_way(path: Path) -> Path | None:
    """The nearest existing one of ``path`` and the folders above it, if it is not a folder."""
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return None if candidate.is_dir() else candidate
    return None


def write_error_message(path: str | os.PathLike, exc: OSError) -> str:
    """``cannot write PATH: <errno text>`` for an ``OSError`` met while writing ``path``."""
    path = Path(path)
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        blocker = _in_the_way(path)
        if blocker is not None:  # mkdir's "File exists" names the wrong problem
            reason = f"{os.strerror(errno.ENOTDIR)} ({blocker} is a file)"
    return f"cannot write {path}: {reason}"


def os_error_line(exc: OSError) -> str:
    """The one line for an ``OSError`` of :data:`WRITE_ERRNOS` that reached the CLI without
    passing :mod:`densessl.io` (a library writing a file of its own): ``cannot write PATH:
    <errno text>`` where only a write meets the errno, else ``PATH: <errno text>`` (it may
    have been a read)."""
    names = [os.fsdecode(n) for n in (exc.filename, getattr(exc, "filename2", None))
             if n is not None and not isinstance(n, int)]
    reason = exc.strerror or str(exc)
    if exc.errno in ONLY_WRITE_ERRNOS:
        return write_error_message(names[-1], exc) if names else f"a write failed: {reason}"
    return f"{names[-1]}: {reason}" if names else reason
