"""``densessl finetune`` and ``densessl run``: did pretraining help downstream, and by how much?

``run``: pretrain (``OUT/pretrain``) → fine-tune every init of ``finetune.inits`` on the recipe's
labeled dataset → ``OUT/results.json``, ``OUT/results.md`` (printed), ``OUT/results.png``.

Each ``results.json`` cell also holds ``parameters``: ``{"loaded": [...], "fresh": [...]}``, the
model's parameter groups that started from the init's weights (e.g. a detector's ``backbone``,
``fpn``, ``box_head``) and those that started fresh (``rpn``, ``box_predictor``, ...).
"""

from __future__ import annotations

import datetime
import math
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from densessl.errors import DensesslError
from densessl.eval.finetune import check_data, evaluate_inits
from densessl.eval.inits import EncoderInit, load_encoder_file, supervised_init
from densessl.eval.labeled_data import build_eval_dataset
from densessl.eval.report import aggregate, write_report
from densessl.io import write_json
from densessl.recipe import Recipe, load_recipe

# Collapse thresholds on pretraining's monitors (densessl.methods.monitors.collapse_stats).
MIN_FEATURE_STD = 0.1
MAX_MEAN_COSINE = 0.95


class CollapseWarning(UserWarning):
    """Pretraining features collapsed: downstream numbers mostly measure a random encoder."""


def collapse_message(metrics: dict) -> str | None:
    """A warning line when pretraining's final monitors show collapse, else ``None``."""
    final = metrics.get("final", {})
    std, cos = final.get("feature_std", math.nan), final.get("mean_cosine", math.nan)
    problems = []
    if std < MIN_FEATURE_STD:
        problems.append(f"feature_std {std:.3f} < {MIN_FEATURE_STD}")
    if cos > MAX_MEAN_COSINE:
        problems.append(f"mean_cosine {cos:.3f} > {MAX_MEAN_COSINE}")
    if not problems:
        return None
    return ("pretraining collapsed (" + ", ".join(problems) + "): all images map to nearly one "
            "feature; try a lower learning rate, a larger queue or more augmentation")


def finetune(recipe: str | Path | dict | Recipe, weights: str | Path | None, out: str | Path,
             overrides: list[str] | None = None, log=print) -> dict[str, Any]:
    """Fine-tune each init of ``finetune.inits`` (``pretrained`` = ``weights``) and write
    ``out/results.{json,md,png}`` plus ``out/runs.json`` (every seed). Returns the results."""
    recipe = load_recipe(recipe, overrides)
    cfg = recipe.finetune
    out = Path(out)
    inits: list[EncoderInit] = []
    if "pretrained" in cfg.inits:
        if weights is None:
            raise DensesslError("finetune.inits has 'pretrained' but no weights were given "
                                "(--weights encoder.pt)")
        inits.append(load_encoder_file(weights, recipe.model.backbone, recipe.data.channels))
    data = build_eval_dataset(cfg.dataset, cfg.options, path=cfg.path,
                              image_size=cfg.image_size, channels=recipe.data.channels,
                              seed=recipe.seed)
    check_data(recipe, data)  # before the supervised init spends time training
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if "random" in cfg.inits:
        inits.append(EncoderInit("random"))
    if "supervised" in cfg.inits:
        inits.append(supervised_init(recipe, data, log=log))
    inits.sort(key=lambda i: cfg.inits.index(i.name))
    start = time.perf_counter()
    parameters: dict = {}
    raw = evaluate_inits(recipe, data, inits, log=log, parameters=parameters)
    torch.set_num_threads(threads)
    results = aggregate(raw)
    # what each run started from: the same for every seed (the last run's record)
    for init, tasks in parameters.items():
        for key, groups in tasks.items():
            results[init][key]["parameters"] = groups
    splits = ", ".join(f"{k} ({len(v)} images)" for k, v in data.eval_splits().items())
    header = (f"## {recipe.name}: {cfg.dataset}, {recipe.model.backbone}, scores (%) on "
              f"{splits}, mean ± std over seeds {cfg.seeds}\n")
    table = write_report(results, out, header)
    write_json(out / "runs.json", {
        "recipe": recipe.name, "dataset": cfg.dataset, "datasets": data.cards,
        "weights": str(weights) if weights is not None else None, "runs": raw,
        "finetune_seconds": round(time.perf_counter() - start, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_threads": torch.get_num_threads(),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    log(table)
    return results


def run(recipe: str | Path | dict | Recipe, out: str | Path, overrides: list[str] | None = None,
        log=print) -> dict[str, Any]:
    """Pretrain into ``out/pretrain``, then :func:`finetune` every init into ``out``."""
    from densessl.pretraining import pretrain

    recipe = load_recipe(recipe, overrides)
    out = Path(out)
    log(f"pretraining {recipe.train.max_steps} steps → {out / 'pretrain'}")
    metrics = pretrain(recipe, out / "pretrain")
    final = metrics["final"]
    log(f"  loss {final.get('loss', math.nan):.4f}, feature_std "
        f"{final.get('feature_std', math.nan):.3f}, mean_cosine "
        f"{final.get('mean_cosine', math.nan):.3f}, {metrics['pairs_per_s']:.1f} pairs/s")
    message = collapse_message(metrics)
    if message:
        warnings.warn(message, CollapseWarning, stacklevel=2)
        log(f"warning: {message}")
    log("fine-tuning " + ", ".join(recipe.finetune.inits))
    return finetune(recipe, out / "pretrain" / "encoder.pt", out, log=log)
