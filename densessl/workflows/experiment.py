"""``densessl finetune`` and ``densessl run``: did pretraining help downstream, and by how much?

``run``: pretrain (``OUT/pretrain``) → fine-tune every init of ``finetune.inits`` on the recipe's
labeled dataset → ``OUT/results.json``, ``OUT/results.md`` (printed), ``OUT/results.png`` (and
``OUT/label_efficiency.png`` with several label fractions; :mod:`densessl.eval.report`).

Each ``results.json`` cell also holds ``parameters``: ``{"loaded": [...], "fresh": [...]}``, the
model's parameter groups that started from the init's weights (e.g. a detector's ``backbone``,
its FPN module by module, ``fpn.inner_blocks.1``, …, ``box_head``) and those that started fresh
(``rpn``, ``box_predictor``, FPN modules pretraining never trained, ...); with
``"trained_modules": "not recorded"`` when the weights predate the record of which neck / box
head modules pretraining trained and were loaded whole.
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

from densessl.data.labeled.build import build_eval_dataset, check_finetune_path
from densessl.errors import DensesslError, RecipeError
from densessl.eval.finetune import check_data, evaluate_inits, floor_metrics
from densessl.eval.inits import imagenet_init, imagenet_labels, supervised_init
from densessl.eval.report import build_results, interval_unit, write_report
from densessl.eval.segmentation import check_input_size
from densessl.eval.spurious import spurious_data
from densessl.io import write_json
from densessl.models.health import collapse_message, encoder_problems, sparse_dense_message
from densessl.models.imagenet import imagenet_state, init_weights_state, normalisation_note
from densessl.models.weights import EncoderInit, load_encoder_file
from densessl.recipe import (
    Recipe,
    load_recipe,
    migrate_flat_loss,
    parse_recipe,
    read_recipe_dict,
)
from densessl.workflows.data_settings import inherit_data_settings, resolve_data_settings
from densessl.workflows.validation import load_valid_recipe


class CollapseWarning(UserWarning):
    """Pretraining features collapsed: downstream numbers mostly measure a random encoder."""


def pretraining_labels(recipe: Recipe) -> str:
    """Which annotations a pretraining recipe reads, in words (``none`` when it reads none):
    the table discloses it next to each init."""
    uses = []
    if recipe.pairs.builder == "cut_paste":
        uses.append("segment masks (cut-paste segment bank)")
    start = recipe.model.init_weights
    if start is not None:  # the start's own training read labels too
        uses.append("ImageNet-1k class labels (model.init_weights: imagenet)"
                    if start == "imagenet" else f"whatever trained model.init_weights {start}")
    return " + ".join(uses + recipe.class_id_uses()) or "none"


def label_free_recipe(recipe: Recipe) -> Recipe:
    """The label-free control: ``recipe`` with ``finetune.label_free_set`` applied (same
    budget). That it is valid and reads no class ids is a Recipe validator's check
    (``Recipe._controls``), so ``densessl recipe`` refuses a bad one."""
    return recipe.control_recipe("label_free")


def control_names(recipe: Recipe) -> list[str]:
    """The inits of ``finetune.inits`` that ``run`` pretrains as controls, in order:
    ``label_free`` and the names of ``finetune.controls``."""
    cfg = recipe.finetune
    return [i for i in cfg.inits if i == "label_free" or i in cfg.controls]


def _weights_labels(path: Path) -> str:
    recipe_file = path.parent / "recipe.yaml"
    if not recipe_file.is_file():
        return "not recorded (no recipe.yaml next to the weights)"
    try:
        # a run's saved recipe, maybe of before the objectives' loss sections: migrated
        return pretraining_labels(parse_recipe(migrate_flat_loss(read_recipe_dict(recipe_file)),
                                               str(recipe_file)))
    except DensesslError:
        return "not recorded (recipe.yaml next to the weights does not parse)"


def _as_paths(weights) -> list[Path]:
    if weights is None:
        return []
    return [Path(w) for w in (weights if isinstance(weights, (list, tuple)) else [weights])]


def finetune_data_defaults(recipe: Recipe) -> Recipe:
    """``recipe`` with ``finetune.path: null`` following the pretraining data where the labeled
    dataset is that data's own: ``pidray`` scores on ``pairs.options.pidray_root`` (the root the
    segments are pasted from: its easy / hard / hidden test splits), ``xbd`` on ``data.path``
    (``data.source: xbd``). With neither root set, the labeled dataset generates its synthetic
    set in that format; it then takes the pretraining's ``synthetic_n`` / ``cache_dir`` /
    ``dataset_seed`` unless
    ``finetune.options`` names them, so it is the very set pretraining read. Other datasets,
    and a ``finetune.path`` that is set, are left as they are."""
    cfg = recipe.finetune
    if cfg.path is not None:
        return recipe
    path, inherited = None, {}
    if cfg.dataset == "pidray" and recipe.pairs.builder == "cut_paste":
        path = recipe.pairs.options.get("pidray_root")
        inherited = {k: recipe.pairs.options[k] for k in ("synthetic_n", "cache_dir",
                                                          "dataset_seed")
                     if recipe.pairs.options.get(k) is not None}
    elif cfg.dataset == "xbd" and recipe.data.source == "xbd":
        path = recipe.data.path
        inherited = {k: recipe.data.options[k] for k in ("cache_dir",)
                     if recipe.data.options.get(k) is not None}
    options = cfg.options if path else {**inherited, **cfg.options}
    if not path and options == cfg.options:
        return recipe
    update = {"path": str(path) if path else None, "options": options}
    return recipe.model_copy(update={"finetune": cfg.model_copy(update=update)})


def _pretraining_reads(recipe: Recipe) -> str | None:
    """What pretraining reads, in words, when it is not the built-in synthetic shapes
    (``finetune.dataset: synthetic``'s images); None when it is."""
    import inspect

    from densessl.pairs import get_pair_builder

    roots = [f"pairs.options.{k}={v}" for k, v in recipe.pairs.options.items()
             if k.endswith("_root") and v]
    if roots:
        return ", ".join(roots)
    builder = get_pair_builder(recipe.pairs.builder)
    if "dataset" not in inspect.signature(builder.__init__).parameters:
        return f"the {recipe.pairs.builder} builder's own data (pairs.options)"
    if recipe.data.source != "synthetic" or recipe.data.path:
        return f"data.source {recipe.data.source}" + (f" at {recipe.data.path}"
                                                      if recipe.data.path else "")
    return None


def check_finetune_dataset(recipe: Recipe, log=print) -> None:
    """Never a silent evaluation on the built-in synthetic shapes of data that pretraining
    did not read. A recipe that does not name ``finetune.dataset`` (a user recipe without a
    finetune section: the default is ``synthetic``) while pretraining reads other data is
    refused in one line before any pretraining: its scores would say nothing about that data,
    and ``densessl pretrain`` is there for pretraining alone. A recipe that names ``synthetic``
    itself gets a warning line and runs."""
    cfg = recipe.finetune
    if cfg.dataset != "synthetic":
        return
    reads = _pretraining_reads(recipe)
    if reads is None:
        return
    if "dataset" not in cfg.model_fields_set:
        raise RecipeError(f"finetune.dataset: not set, so fine-tuning would score on the "
                          f"built-in synthetic shapes while pretraining reads {reads}; set "
                          "finetune.dataset (and finetune.path) to labeled data of that domain, "
                          "or finetune.dataset: synthetic to score on the shapes anyway "
                          "(densessl pretrain pretrains without fine-tuning)")
    log(f"warning: finetune.dataset is synthetic: scores are on the built-in synthetic shapes, "
        f"not on the data pretraining reads ({reads})")


def finetune(recipe: str | Path | dict | Recipe,
             weights: str | Path | list[str | Path] | None, out: str | Path,
             overrides: list[str] | None = None, log=print, *,
             label_free_weights: str | Path | list[str | Path] | None = None,
             control_weights: dict[str, str | Path | list[str | Path]] | None = None,
             force: bool = False, check_dataset: bool = True,
             validate: bool = True) -> dict[str, Any]:
    """Fine-tune each init of ``finetune.inits`` (``pretrained`` = ``weights``, ``label_free``
    = ``label_free_weights``, a control of ``finetune.controls`` = ``control_weights[name]``;
    several files = one pretraining per seed, zipped with
    ``finetune.seeds``, or all with its one seed), score the floor, and write
    ``out/results.{json,md,png}`` (``label_efficiency.png`` with several fractions) plus
    ``out/runs.json`` (every seed). Returns the results. ``finetune.path: null`` follows the
    pretraining data (:func:`finetune_data_defaults`); ``validate=False``: the caller already
    validated the recipe (the CLI, :func:`run`); ``check_dataset``: refuse / warn about
    scoring on the synthetic shapes (:func:`check_finetune_dataset`; ``run`` did it already)."""
    from densessl.workflows.resume import check_writable

    # the API entry refuses what the CLI refuses; run() and the CLI checked it already
    recipe = load_valid_recipe(recipe, overrides, pretraining=False) if validate \
        else load_recipe(recipe, overrides)
    if check_dataset:
        check_finetune_dataset(recipe, log)
    recipe = finetune_data_defaults(recipe)
    cfg = recipe.finetune
    out = Path(out)
    check_finetune_path(cfg.dataset, cfg.path)  # before anything is written
    check_writable(out)  # before any training, not after it
    check_input_size(recipe)
    inits: list[EncoderInit] = []
    labels: dict[str, str] = {}
    # how many pretraining runs the std and intervals cover; with one finetune.seed, that
    # seed for every run (broadcast)
    given = {"pretrained": (weights, "--weights encoder.pt"),
             "label_free": (label_free_weights, "--label-free-weights encoder.pt"),
             **{name: ((control_weights or {}).get(name), f"--control {name}=encoder.pt")
                for name in cfg.controls}}
    unknown = sorted(set(control_weights or {}) - set(cfg.controls))
    if unknown:
        raise DensesslError(f"weights given for {unknown}, which are not finetune.controls "
                            f"({', '.join(cfg.controls) or 'none'})")
    n_runs = max((len(_as_paths(w)) for name, (w, _) in given.items() if name in cfg.inits),
                 default=1)
    if len(cfg.seeds) == 1 and n_runs > 1:
        cfg = cfg.model_copy(update={"seeds": cfg.seeds * n_runs})
        recipe = recipe.model_copy(update={"finetune": cfg})
    for name, (w, flag) in given.items():
        files = _as_paths(w)
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
    if "imagenet" in cfg.inits:  # read (or refused, saying how to provide it) before training
        inits.append(imagenet_init(recipe))
        labels["imagenet"] = imagenet_labels(inits[-1])
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
    if "imagenet" in cfg.inits and normalisation_note(recipe):
        log(normalisation_note(recipe))
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
    unit = interval_unit(n_runs, cfg.seeds)
    results = build_results(raw, floor, {k: labels[k] for k in cfg.inits if k in labels},
                            primary=cfg.primary, unit=unit)
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
              f"{splits}, mean ± std over {unit}: seeds {cfg.seeds}{pretrain_seeds}"
              f"{spurious}\n")
    # how the labeled splits were made (a seeded split can be repeated and checked for leaks)
    # and how the images were scaled and normalised
    results["data"] = {"dataset": cfg.dataset, "path": cfg.path, "splits": data.split_record,
                       "eval_splits": {k: len(v) for k, v in data.eval_splits().items()},
                       "bit_depth": data.bit_depth if data.bit_depth is not None
                       else recipe.data.bit_depth,
                       "normalisation": {"mean": recipe.augment.mean, "std": recipe.augment.std}}
    table = write_report(results, out, header)
    write_json(out / "runs.json", {
        "recipe": recipe.name, "dataset": cfg.dataset, "datasets": data.cards,
        "weights": [str(w) for w in _as_paths(weights)],
        "label_free_weights": [str(w) for w in _as_paths(label_free_weights)],
        "control_weights": {k: [str(w) for w in _as_paths(v)]
                            for k, v in (control_weights or {}).items()}, "runs": raw,
        # the ImageNet weights the imagenet init started from (file, sha256, first conv)
        **({"imagenet_weights": next(i.provenance for i in inits if i.name == "imagenet")}
           if "imagenet" in cfg.inits else {}),
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
        metrics = pretrain(recipe.model_copy(update={"seed": seed}), where, overwrite=overwrite,
                           validate=False)  # run() validated it, controls included
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


def check_start_weights(recipe: Recipe, log=print) -> None:
    """Read every start weight ``run`` needs before it pretrains: ``model.init_weights`` of
    each recipe it pretrains (this one, the label-free control) and the ``imagenet`` init's
    weights. A missing ImageNet file is refused here, saying how to provide it, not after
    the pretraining."""
    cfg = recipe.finetune
    pretrained = ([recipe] if "pretrained" in cfg.inits else []) + [
        recipe.control_recipe(name) for name in control_names(recipe)]
    for r in pretrained:
        init_weights_state(r)
    if "imagenet" in cfg.inits:
        imagenet_state(recipe)
    note = normalisation_note(recipe)
    if note and any(r.model.init_weights == "imagenet" for r in pretrained):
        log(note)


def run(recipe: str | Path | dict | Recipe, out: str | Path, overrides: list[str] | None = None,
        log=print, overwrite: bool = False, validate: bool = True) -> dict[str, Any]:
    """Pretrain into ``out/pretrain`` (and each control, ``label_free`` or one of
    ``finetune.controls``, into ``out/pretrain_<name>``; one folder ``seed<s>`` per
    pretraining seed when there are several), then :func:`finetune` every init into
    ``out``."""
    from densessl.workflows.resume import check_writable

    # once, for every stage: a bad finetune key fails now, not after pretraining
    recipe = load_valid_recipe(recipe, overrides) if validate else load_recipe(recipe, overrides)
    check_finetune_dataset(recipe, log)  # never a silent score on the synthetic shapes
    recipe = finetune_data_defaults(recipe)  # finetune.path: null follows the pretraining data
    cfg = recipe.finetune
    out = Path(out)
    check_finetune_path(cfg.dataset, cfg.path)  # one line, before anything is written
    if (out / "results.json").exists() and not overwrite:
        raise DensesslError(f"{out} already holds results (results.json); pass --overwrite "
                            "to replace them or choose another --out")
    check_start_weights(recipe, log)  # a missing ImageNet file: before anything is written
    check_writable(out)
    check_input_size(recipe)  # before pretraining: smp would refuse it only after
    weights = (_pretrain_all(recipe, out / "pretrain", log, overwrite)
               if "pretrained" in cfg.inits else None)
    controls = {}
    for name in control_names(recipe):
        control = recipe.control_recipe(name)
        overrides_, _ = recipe.control_overrides(name)
        log(f"control {name}: {overrides_} (reads: {pretraining_labels(control)})")
        controls[name] = _pretrain_all(control, out / f"pretrain_{name}", log, overwrite)
    log("fine-tuning " + ", ".join(cfg.inits))
    # a collapse was warned about above (run's documented behaviour); a diverged pretraining
    # never gets here (it stops with an error)
    label_free = controls.pop("label_free", None)
    return finetune(recipe, weights, out, log=log, label_free_weights=label_free,
                    control_weights=controls, force=True, check_dataset=False, validate=False)
