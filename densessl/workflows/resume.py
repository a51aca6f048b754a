"""What a pretraining output folder holds, and whether a run may start or resume in it.

Everything here only reads: a refused resume leaves ``recipe.yaml``, ``metrics.json`` and the
checkpoint exactly as they were.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from densessl.data.cache import torch_load_problem
from densessl.errors import DensesslError
from densessl.models.weights import read_side_json
from densessl.recipe import Recipe, migrate_flat_loss, parse_recipe

# Recipe keys a resume may change: they do not change what is trained (the step budget, and
# how often the run logs, saves and how it reacts to a non-finite step). Everything else
# must match the checkpoint's recipe.
RESUMABLE_KEYS = {"name", "train.max_steps", "train.log_every", "train.checkpoint_every",
                  "train.checkpoint_minutes", "train.num_workers", "train.on_nonfinite",
                  # where the ImageNet weights lie: a resume restores the checkpoint's weights
                  "model.weights_file"}
RESUMABLE_PREFIXES = ("finetune.",)  # read after pretraining, never by it

# the files a pretraining run writes into its folder (besides recipe.yaml)
RUN_FILES = ("checkpoints/last.ckpt", "encoder.pt", "neck.pt", "box_head.pt", "encoder.json",
             "metrics.json")


@dataclasses.dataclass
class ResumeState:
    step: int
    samples_seen: int
    metrics: dict
    nothing_to_do: bool = False


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: data}


def recipe_differences(saved: dict, recipe: Recipe) -> list[str]:
    """``key: saved → new`` for every key that differs and changes the result."""
    try:  # fill keys added since the checkpoint was written with their defaults
        # flat loss keys of before the objectives' sections: moved (an exact mapping)
        saved = parse_recipe(migrate_flat_loss(saved), "<checkpoint>").model_dump(mode="json")
    except DensesslError:
        pass
    old, new = _flatten(saved), _flatten(recipe.model_dump(mode="json"))
    keys = sorted(set(old) | set(new))
    # loss.num_classes null means "from the data": the saved recipe holds what it resolved to
    # (a changed data set is caught when the builder's ids are checked against it)
    if new.get("loss.num_classes") is None:
        new["loss.num_classes"] = old.get("loss.num_classes")
    # auto means "from the data" too: the saved recipe holds the values it resolved to, and a
    # resumed run reads them back (densessl.workflows.data_settings.inherit_data_settings)
    for key in ("data.bit_depth", "augment.mean", "augment.std"):
        if new.get(key) == "auto":
            new[key] = old.get(key)
    return [f"{k}: {old.get(k, '<absent>')!r} → {new.get(k, '<absent>')!r}" for k in keys
            if old.get(k) != new.get(k) and k not in RESUMABLE_KEYS
            and not k.startswith(RESUMABLE_PREFIXES)]


def read_checkpoint(path: Path, what: str = "--resume") -> dict:
    """A Lightning checkpoint, read with ``weights_only=True``: densessl's checkpoints hold
    tensors and plain types only (the recipe as a dict, RNG states as tensors and lists,
    Lightning's loop and callback states), as Lightning itself loads them on resume, so a
    checkpoint carrying any other pickled object is refused, never unpickled."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one line
        raise DensesslError(f"{what}: {path} is not a readable checkpoint "
                            f"({torch_load_problem(exc)})") from None
    if not isinstance(checkpoint, dict):
        raise DensesslError(f"{what}: {path} is not a readable checkpoint (a "
                            f"{type(checkpoint).__name__}, not a dict)")
    return checkpoint


def describe_run(out: Path) -> str | None:
    """``step N of M, finished`` for a folder that holds a pretraining run, else ``None``."""
    if not any((out / name).exists() for name in RUN_FILES):
        return None
    try:
        metrics = read_side_json(out / "metrics.json") or {}
    except DensesslError as exc:  # the folder holds a run all the same
        return f"an earlier pretraining run (whose metrics.json is damaged: {exc})"
    if "steps" not in metrics:
        return "an earlier pretraining run"
    status = metrics.get("status", "finished" if metrics.get("finished") else "running")
    return f"a pretraining run at step {metrics['steps']} ({status})"


def prepare_out(recipe: Recipe, out: Path, resume: bool, overwrite: bool) -> ResumeState | None:
    """Decide, before anything is written, whether this run may go into ``out``.

    Returns ``None`` for a fresh run, a :class:`ResumeState` for a valid resume; raises a
    one-line :class:`DensesslError` otherwise."""
    ckpt = out / "checkpoints" / "last.ckpt"
    if not resume:
        held = describe_run(out)
        if held is not None and not overwrite:
            raise DensesslError(f"{out} already holds {held}; pass --resume to continue it, "
                                "--overwrite to replace it, or choose another --out")
        return None
    if overwrite:
        raise DensesslError("--resume and --overwrite exclude each other")
    if not ckpt.is_file():
        raise DensesslError(f"--resume: no checkpoint at {ckpt}")
    checkpoint = read_checkpoint(ckpt)
    saved = (checkpoint.get("hyper_parameters") or {}).get("recipe")
    if not isinstance(saved, dict):
        raise DensesslError(f"--resume: {ckpt} holds no densessl recipe")
    diffs = recipe_differences(saved, recipe)
    if diffs:
        raise DensesslError(
            f"--resume: the recipe differs from the one {ckpt} was trained with in "
            f"{'; '.join(diffs)} (only train.max_steps and logging/checkpoint keys may change "
            "on resume); resume with the saved recipe (its recipe.yaml) or start a new run "
            "in another --out")
    step = int(checkpoint.get("global_step", 0))
    extra = checkpoint.get("densessl") or {}
    t = recipe.train
    devices = t.devices if isinstance(t.devices, int) else 1
    samples = int(extra.get("samples_seen", step * t.batch_size * devices * t.num_nodes))
    metrics = extra.get("metrics") or read_side_json(out / "metrics.json") or {}
    if t.max_steps < step:
        raise DensesslError(f"--resume: {ckpt} is at step {step}, past train.max_steps "
                            f"{t.max_steps}; nothing was changed (raise train.max_steps to "
                            "continue)")
    return ResumeState(step, samples, metrics, nothing_to_do=t.max_steps == step)


def check_writable(folder: Path) -> None:
    """One line, before any work, when ``folder`` cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".densessl-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise DensesslError(f"cannot write to output folder {folder}: "
                            f"{exc.strerror or exc}") from None


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the temporaries of saves an earlier run was killed in the middle of
    (``.last.ckpt.tmp``, and atomic_write's ``.NAME.*.tmp`` of this run's files)."""
    removed = []
    names = [Path(n).name for n in RUN_FILES] + ["recipe.yaml"]
    for folder in (out, out / "checkpoints"):
        if not folder.is_dir():
            continue
        for path in folder.glob(".*.tmp"):
            if path.name == ".last.ckpt.tmp" or any(path.name.startswith(f".{n}.")
                                                    for n in names):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def clear_run(out: Path) -> None:
    """Remove an earlier run's outputs (``--overwrite``), so none is taken for the new run's."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
