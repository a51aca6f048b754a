"""Where densessl caches what it derives from data: synthetic sets, segment banks, band
statistics. One folder, ``$DENSESSL_CACHE`` or ``~/.cache/densessl``, unless a recipe gives
``cache_dir``."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from densessl.data.registry import SYNTHESIZERS


def default_cache_dir() -> Path:
    """``$DENSESSL_CACHE`` or ``~/.cache/densessl``."""
    return Path(os.environ.get("DENSESSL_CACHE", "~/.cache/densessl")).expanduser()


def cached_synthetic(kind: str, n: int | None, seed: int, cache_dir: str | Path | None) -> Path:
    """Root of the synthetic ``kind`` set (``n`` items, ``seed``), generated once under
    ``cache_dir/synthetic/`` and reused afterwards. ``kind`` is a registered synthesizer; the
    caller imports the module that registers it.

    Generation writes into a private temporary folder that is renamed into place, so parallel
    runs (DataLoader workers, two trainings) never see a half-written set.
    """
    base = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    final = base / "synthetic" / f"{kind}-n{n}-seed{seed}"
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        SYNTHESIZERS[kind](tmp, n, seed)
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():  # not a lost race: a real failure
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
