"""``densessl finetune`` and ``densessl run``: did pretraining help downstream, and by how much?

``run``: pretrain (``OUT/pretrain``) → fine-tune every init of ``finetune.inits`` on the recipe's
labeled dataset → ``OUT/results.json``, ``OUT/results.md`` (printed), ``OUT/results.png``.

Each ``results.json`` cell also holds ``parameters``: ``{"loaded": [...], "fresh": [...]}``, the
model's parameter groups that started from the init's weights (e.g. a detector's ``backbone``,
``fpn``, ``box_head``) and those that started fresh (``rpn``, ``box_predictor``, ...).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from densessl.errors import DensesslError
from densessl.eval.finetune import check_data, evaluate_inits, floor_metrics
from densessl.eval.inits import supervised_init
from densessl.eval.labeled_data import build_eval_dataset, check_finetune_path
from densessl.eval.report import build_results, write_report
from densessl.eval.segmentation import check_input_size
from densessl.eval.spurious import spurious_data
from densessl.io import write_json
from densessl.models.health import collapse_message, encoder_problems, sparse_dense_message
from densessl.models.weights import EncoderInit, load_encoder_file
from densessl.recipe import Recipe, apply_overrides, load_recipe, parse_recipe
from densessl.workflows.data_settings import inherit_data_settings, resolve_data_settings


class CollapseWarning(UserWarning):
    """Pretraining features collapsed: downstream numbers mostly measure a random encoder."""


def pretraining_labels(recipe: Recipe) -> str:
    """Which annotations a pretraining recipe reads, in words (``none`` when it reads none):
    the table discloses it next to each init."""
    uses = []
    if recipe.pairs.builder == "cut_paste":
        uses.append("segment masks (cut-paste segment bank)")
    return " + ".join(uses + recipe.class_id_uses()) or "none"


def label_free_recipe(recipe: Recipe) -> Recipe:
    """The label-free control: ``recipe`` with ``finetune.label_free_set`` applied (same
    budget). That it is valid and reads no class ids is a Recipe validator's check
    (``Recipe._label_free_control``), so ``densessl recipe`` refuses a bad one."""
    data = apply_overrides(recipe.model_dump(mode="json"),
                           [f"{k}={json.dumps(v)}" for k, v in
                            recipe.finetune.label_free_set.items()])
    return parse_recipe(data, "finetune.label_free_set")


def _weights_labels(path: Path) -> str:
    recipe_file = path.parent / "recipe.yaml"
    if not recipe_file.is_file():
        return "not recorded (no recipe.yaml next to the weights)"
    try:
        return pretraining_labels(load_recipe(recipe_file))
    except DensesslError:
        return "not recorded (recipe.yaml next to the weights does not parse)"


def _as_paths(weights) -> list[Path]:
    if weights is None:
        return []
    return [Path(w) for w in (weights if isinstance(weights, (list, tuple)) else [weights])]


def finetune(recipe: str | Path | dict | Recipe,
             weights: str | Path | list[str | Path] | None, out: str | Path,
             overrides: list[str] | None = None, log=print, *,
             label_free_weights: str | Path | list[str | Path] | None = None,
             force: bool = False) -> dict[str, Any]:
    """Fine-tune each init of ``finetune.inits`` (``pretrained`` = ``weights``, ``label_free``
    = ``label_free_weights``; several files = one pretraining per seed, zipped with
    ``finetune.seeds``), score the floor, and write ``out/results.{json,md,png}`` plus
    ``out/runs.json`` (every seed). Returns the results."""
    from densessl.workflows.resume import check_writable

    recipe = load_recipe(recipe, overrides)
    cfg = recipe.finetune
    out = Path(out)
    check_writable(out)  # before any training, not after it
    check_input_size(recipe)
    check_finetune_path(cfg.dataset, cfg.path)
    inits: list[EncoderInit] = []
    labels: dict[str, str] = {}
    for name, files, flag in (("pretrained", _as_paths(weights), "--weights encoder.pt"),
                              ("label_free", _as_paths(label_free_weights),
                               "--label-free-weights encoder.pt")):
        if name not in cfg.inits:
            continue
        if not files:
            raise DensesslError(f"finetune.inits has {name!r} but no weights were given "
                                f"({flag})")
        if len(files) not in (1, len(cfg.seeds)):
            raise DensesslError(f"{name}: {len(files)} weight files for {len(cfg.seeds)} "
                                f"finetune.seeds; expected 1 or {len(cfg.seeds)}")
        for f in files:
            init = load_encoder_file(f, recipe.model.backbone, recipe.data.channels)
            metrics_file = Path(f).parent / "metrics.json"
            problems = encoder_problems(
                torch.load(f, map_location="cpu", weights_only=True),
                json.loads(metrics_file.read_text()) if metrics_file.is_file() else None)
            if problems and not force:  # a diverged or collapsed encoder is not a result
                raise DensesslError(f"{name} weights {f}: {'; '.join(problems)}; pass "
                                    "--force to fine-tune from it anyway")
            inits.append(dataclasses.replace(init, name=name))
        labels[name] = _weights_labels(files[0])
    # bit depth and normalisation as the encoder saw them in pretraining (its recipe.yaml);
    # without pretrained weights, computed from the recipe's pretraining data
    if inherit_data_settings(recipe, next(iter(_as_paths(weights)), None)):
        from densessl.build import build_pair_builder

        resolve_data_settings(recipe, build_pair_builder(recipe))
    data = build_eval_dataset(cfg.dataset, cfg.options, path=cfg.path,
                              image_size=cfg.image_size, channels=recipe.data.channels,
                              seed=recipe.seed, bit_depth=recipe.data.bit_depth)
    if cfg.spurious is not None:  # before the supervised init, which trains on it too
        data = spurious_data(data, cfg.spurious, recipe.seed)
    check_data(recipe, data)  # before the supervised init spends time training
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if "random" in cfg.inits:
        inits.append(EncoderInit("random"))
        labels["random"] = "none"
    if "supervised" in cfg.inits:
        sup = supervised_init(recipe, data, log=log)
        inits.append(sup)
        labels["supervised"] = (f"all segmentation labels of the "
                                f"{sup.provenance.get('trained_on', 'train')} split")
    inits.sort(key=lambda i: cfg.inits.index(i.name))
    start = time.perf_counter()
    parameters: dict = {}
    floor = floor_metrics(recipe, data)
    raw = evaluate_inits(recipe, data, inits, log=log, parameters=parameters)
    torch.set_num_threads(threads)
    results = build_results(raw, floor, {k: labels[k] for k in cfg.inits if k in labels})
    # what each run started from: the same for every seed (the last run's record)
    for init, tasks in parameters.items():
        for key, groups in tasks.items():
            results[init][key]["parameters"] = groups
    splits = ", ".join(f"{k} ({len(v)} images)" for k, v in data.eval_splits().items())
    pretrain_seeds = (f", pretraining seeds {[s for s in cfg.pretrain_seeds]}"
                      if cfg.pretrain_seeds and len(cfg.pretrain_seeds) > 1 else "")
    spurious = (f"; spurious: {cfg.spurious.artifact} on train images with class "
                f"{data.class_names[cfg.spurious.class_id]}, on test images without it"
                if cfg.spurious is not None else "")
    header = (f"## {recipe.name}: {cfg.dataset}, {recipe.model.backbone}, scores (%) on "
              f"{splits}, mean ± std over seeds {cfg.seeds}{pretrain_seeds}{spurious}\n")
    # how the labeled splits were made (a seeded split can be repeated and checked for leaks)
    # and how the images were scaled and normalised
    results["data"] = {"dataset": cfg.dataset, "splits": data.split_record,
                       "eval_splits": {k: len(v) for k, v in data.eval_splits().items()},
                       "bit_depth": data.bit_depth if data.bit_depth is not None
                       else recipe.data.bit_depth,
                       "normalisation": {"mean": recipe.augment.mean, "std": recipe.augment.std}}
    table = write_report(results, out, header)
    write_json(out / "runs.json", {
        "recipe": recipe.name, "dataset": cfg.dataset, "datasets": data.cards,
        "weights": [str(w) for w in _as_paths(weights)],
        "label_free_weights": [str(w) for w in _as_paths(label_free_weights)], "runs": raw,
        "floor": floor,
        "finetune_seconds": round(time.perf_counter() - start, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_threads": torch.get_num_threads(),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    log(table)
    return results


def _pretrain_all(recipe: Recipe, folder: Path, log, overwrite: bool = False) -> list[Path]:
    """One pretraining per ``finetune.pretrain_seeds`` (``folder``, or ``folder/seed<s>`` with
    several); returns the encoder files."""
    from densessl.workflows.pretraining import pretrain

    seeds = recipe.finetune.pretrain_seeds or [recipe.seed]
    files = []
    for seed in seeds:
        where = folder if len(seeds) == 1 else folder / f"seed{seed}"
        log(f"pretraining {recipe.train.max_steps} steps, seed {seed} → {where}")
        metrics = pretrain(recipe.model_copy(update={"seed": seed}), where, overwrite=overwrite)
        final = metrics["final"]
        log(f"  loss {final.get('loss', math.nan):.4f}, feature_std "
            f"{final.get('feature_std', math.nan):.3f}, mean_cosine "
            f"{final.get('mean_cosine', math.nan):.3f}, {metrics['pairs_per_s']:.1f} pairs/s")
        message = collapse_message(metrics)
        if message:
            warnings.warn(message, CollapseWarning, stacklevel=3)
            log(f"warning: {message}")
        sparse = sparse_dense_message(metrics)
        if sparse:
            log(f"note: {sparse}")
        files.append(where / "encoder.pt")
    return files


def run(recipe: str | Path | dict | Recipe, out: str | Path, overrides: list[str] | None = None,
        log=print, overwrite: bool = False) -> dict[str, Any]:
    """Pretrain into ``out/pretrain`` (and the label-free control into
    ``out/pretrain_label_free``; one folder ``seed<s>`` per pretraining seed when there are
    several), then :func:`finetune` every init into ``out``."""
    from densessl.workflows.resume import check_writable

    recipe = load_recipe(recipe, overrides)
    cfg = recipe.finetune
    out = Path(out)
    if (out / "results.json").exists() and not overwrite:
        raise DensesslError(f"{out} already holds results (results.json); pass --overwrite "
                            "to replace them or choose another --out")
    check_writable(out)
    check_input_size(recipe)  # before pretraining: smp would refuse it only after
    check_finetune_path(cfg.dataset, cfg.path)
    control = label_free_recipe(recipe) if "label_free" in cfg.inits else None
    weights = (_pretrain_all(recipe, out / "pretrain", log, overwrite)
               if "pretrained" in cfg.inits else None)
    label_free = None
    if control is not None:
        log(f"label-free control: {cfg.label_free_set} (reads: {pretraining_labels(control)})")
        label_free = _pretrain_all(control, out / "pretrain_label_free", log, overwrite)
    log("fine-tuning " + ", ".join(cfg.inits))
    # a collapse was warned about above (run's documented behaviour); a diverged pretraining
    # never gets here (it stops with an error)
    return finetune(recipe, weights, out, log=log, label_free_weights=label_free, force=True)
