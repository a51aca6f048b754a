"""Where densessl caches what it derives from data: synthetic sets, segment banks, band
statistics. One folder, ``$DENSESSL_CACHE`` or ``~/.cache/densessl``, unless a recipe gives
``cache_dir``."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path

from densessl.data.registry import SYNTHESIZERS


def default_cache_dir() -> Path:
    """``$DENSESSL_CACHE`` or ``~/.cache/densessl``."""
    return Path(os.environ.get("DENSESSL_CACHE", "~/.cache/densessl")).expanduser()


def torch_load_problem(exc: Exception) -> str:
    """One line saying why ``torch.load(..., weights_only=True)`` refused a file (torch's own
    message spans many lines and suggests ``weights_only=False``, which would run the file's
    code). Shared by every loader of files densessl did not just write (caches, weights,
    checkpoints)."""
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return (f"it holds a pickled Python object ({found[1]}), not only tensors and plain "
                "types; refused, because unpickling it could run code (weights_only=True)")
    if isinstance(exc, pickle.UnpicklingError) and "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
        return f"not a torch file, or a damaged one ({' '.join(detail.split())})"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else 'unreadable'}"


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
