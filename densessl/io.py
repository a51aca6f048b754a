"""Atomic file writes: a crash, a bad input or a full disk never leaves a half-written result
behind, and a file that cannot be written is one :class:`~densessl.errors.OutputError`
(``cannot write PATH: No space left on device``), raised from the ``OSError``."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from densessl.errors import WRITE_ERRNOS, OutputError, write_error_message


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _about(exc: OSError, path: Path, tmp: Path | None) -> bool:
    """Whether ``exc`` is about writing ``path``: it names no file (a ``write`` that found the
    disk full), or ``path``, its temporary (or a candidate name of it) or a folder above it.
    Another file named (one a writer reads) is not this write's error."""
    names = [n for n in (exc.filename, getattr(exc, "filename2", None)) if n is not None]
    if not names:
        return True
    target = Path(os.path.abspath(path))
    ours = {target, *target.parents} | ({Path(os.path.abspath(tmp))} if tmp else set())
    for name in names:
        if isinstance(name, int):  # a file descriptor
            return True
        named = Path(os.path.abspath(os.fsdecode(name)))
        if named in ours or (named.parent == target.parent and  # a temporary's candidate name
                             named.name.startswith(f".{target.name}.") and
                             named.name.endswith(".tmp")):
            return True
    return False


def _output_error(exc: OSError, path: Path, tmp: Path | None = None) -> OutputError | None:
    if exc.errno in WRITE_ERRNOS and _about(exc, path, tmp):
        return OutputError(write_error_message(path, exc))
    return None


@contextlib.contextmanager
def writing(path: str | Path):
    """Around a write that is not :func:`atomic_write`'s (a folder made, a log appended to):
    an ``OSError`` that means ``path`` cannot be written becomes one :class:`OutputError`
    naming it; any other error passes unchanged."""
    try:
        yield
    except OSError as exc:
        error = _output_error(exc, Path(path))
        if error is None:
            raise
        raise error from exc


def make_folder(path: str | Path) -> Path:
    """``mkdir -p path``; a file in the way, no permission or a read-only disk is one
    :class:`OutputError`."""
    path = Path(path)
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path: str | Path, write, temporary: str | None = None) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it into place
    (the rename is atomic, so readers see the old file or the new one, never half of it).
    ``temporary`` names the temporary (default: a unique ``.NAME.XXXXXXXX.tmp``); a fixed
    name is for a file one process writes at a time (``.last.ckpt.tmp``).

    On any failure the temporary is removed and an existing ``path`` is left as it was; an
    ``OSError`` that means ``path`` cannot be written there (permission, a file in the way,
    read-only file system, disk full or quota) becomes an :class:`OutputError` naming
    ``path``."""
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if temporary is None:
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        else:
            name = str(path.with_name(temporary))
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(fd)
        tmp = Path(name)
        try:
            write(tmp)
            # mkstemp makes the file 0600; give it the mode a plain open() would (0666 & ~umask)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):  # the error that matters is the write's
                tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        error = _output_error(exc, path, tmp)
        if error is None:
            raise
        raise error from exc
    return path


def write_json(path: str | Path, data: Any) -> Path:
    return atomic_write(Path(path), lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(Path(path), lambda tmp: tmp.write_text(text))


class _Sink:
    """The file ``torch.save`` writes through. torch reports a failed write of a file as a
    ``RuntimeError`` ("unexpected pos ..."); this keeps the ``OSError`` behind it."""

    def __init__(self, file) -> None:
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as exc:
            self.error = exc
            raise


def _torch_save(obj: Any, tmp: Path) -> None:
    with open(tmp, "wb") as file:
        sink = _Sink(file)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is None:
                raise
            raise sink.error from None


def save_torch(path: str | Path, obj: Any, temporary: str | None = None) -> Path:
    return atomic_write(Path(path), lambda tmp: _torch_save(obj, tmp), temporary)
