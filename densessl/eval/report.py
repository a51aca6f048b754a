"""Results: mean ± std over seeds, the floor, the ceiling and paired differences with their
95 % intervals → results.json, a markdown table (printed) and plots.

``results.json``::

    {"floor":      {"<task>": {"<metric>": v, "<metric>_std": 0.0, "n_seeds": 1}},
     "<init>":     {"<task>": {"<metric>": mean, "<metric>_std": std, "n_seeds": n}}, ...
     "differences": {"<init> - random": {"<task>": {"<metric>": {"mean", "std", "n",
                                                               "ci_low", "ci_high"}}},
                     "pretrained - imagenet": {...}},
     "protocol":   {"primary": "<task>/<metric>", "ceiling": "supervised",
                    "discriminates": true | false | null, "tasks": {"<task>": verdict},
                    "warnings": [...], "unit": "what the std and intervals cover",
                    "labels": {"<init>": "what labels it used"}}}

``unit`` says what the std, the intervals and the pairs run over: ``"probe / fine-tuning seeds
of one pretraining run (n=3)"``, or with ``finetune.pretrain_seeds`` ``"pretraining runs (n=5,
each with its own probe / fine-tuning seed)"`` (the i-th run fine-tuned with the i-th seed).
A sweep's ``summary.csv`` (:mod:`densessl.sweep.report`) has ``<metric>_std`` averaged over
the sweep's seeds, next to ``<metric>:std``, the spread over those *sweep* seeds; both come
from :func:`mean_std`.

Task keys look like ``segmentation/fpn@10%`` (see :func:`densessl.eval.finetune.task_runs`).
``floor`` is what predicting the majority class everywhere (no box, for detection) scores,
shaped like an init. A difference pairs the i-th seed of an init with the i-th seed of the
random init; its interval is Student's t over those paired differences. With an ``imagenet``
init, ``pretrained - imagenet`` (does domain pretraining beat starting from ImageNet?) follows,
paired the same way (:data:`CONTRASTS`). ``primary`` is ``finetune.primary`` resolved
(:func:`densessl.recipe.resolve_primary`); every task key (each label fraction) has its own
verdict in ``tasks``; ``discriminates`` is the primary's.

``results.png``: one panel per evaluation split (metric prefix ``easy/`` ...), one group per
task at its largest label fraction, the floor and the ceiling as lines, each other init's mean
with its 95 % t-interval. ``label_efficiency.png`` (only when ``finetune.label_fractions`` has
several): score against label fraction per task and split.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from scipy import stats

from densessl.io import atomic_write, write_json, write_text
from densessl.recipe import DETECTION_METRICS, resolve_primary, split_task_key

HEADLINE = ("mIoU", "fg_mIoU", "box_mAP", "box_AP50", "box_AP75", "box_AR100", "mask_mAP")
#: top-level keys of results.json that are not inits
RESERVED = ("differences", "protocol", "data")
BASELINE, CEILING, FLOOR = "random", "supervised", "floor"
#: paired differences reported after every ``<init> - random``: (init, baseline)
CONTRASTS = (("pretrained", "imagenet"),)
CONFIDENCE = 0.95


def inits_of(results: dict) -> list[str]:
    """The init-shaped entries of a results dict (``floor`` included), in order."""
    return [k for k in results if k not in RESERVED]


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample std (ddof 1) of the non-NaN ``values``: std 0 with one value, mean NaN
    with none. The one aggregation of this report and of a sweep's summary."""
    array = np.asarray(list(values), dtype=float)
    ok = array[~np.isnan(array)]
    return (float(ok.mean()) if len(ok) else math.nan,
            float(ok.std(ddof=1)) if len(ok) > 1 else 0.0)


def aggregate(raw: dict[str, dict[str, list[dict]]]) -> dict:
    """Per-seed metric dicts → mean and (sample) std over the seeds per metric
    (:func:`mean_std`; ``<metric>_std``); std is 0 for one seed."""
    results: dict = {}
    for init, tasks in raw.items():
        for task, runs in tasks.items():
            cell = results.setdefault(init, {}).setdefault(task, {})
            for key in runs[0]:
                cell[key], cell[f"{key}_std"] = mean_std(r[key] for r in runs)
            cell["n_seeds"] = len(runs)
    return results


def t_half_width(std: float, n: int, confidence: float = CONFIDENCE) -> float:
    """Half width of the Student-t interval of a mean of ``n`` values with sample std ``std``
    (NaN under two values)."""
    if n < 2 or not math.isfinite(std):
        return math.nan
    return float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)


def paired_interval(a: list[float], b: list[float], confidence: float = CONFIDENCE
                    ) -> dict[str, float]:
    """Mean, sample std, count and the two-sided Student-t interval of ``a[i] − b[i]`` (pairs
    with a NaN are left out; fewer than two pairs give a NaN interval)."""
    if len(a) != len(b):
        raise ValueError(f"paired difference: {len(a)} values against {len(b)}")
    d = np.array(a, dtype=np.float64) - np.array(b, dtype=np.float64)
    d = d[~np.isnan(d)]
    n = len(d)
    mean = float(d.mean()) if n else math.nan
    std = float(d.std(ddof=1)) if n > 1 else math.nan
    half = t_half_width(std, n, confidence)
    return {"mean": mean, "std": std, "n": n, "ci_low": mean - half, "ci_high": mean + half}


def paired_differences(raw: dict[str, dict[str, list[dict]]], baseline: str = BASELINE
                       ) -> dict:
    """``{"<init> - <baseline>": {task: {metric: paired_interval}}}`` for every init other
    than the baseline, over the headline metrics both have (seed i paired with seed i)."""
    out: dict = {}
    if baseline not in raw:
        return out
    for init, tasks in raw.items():
        if init in (baseline, FLOOR):
            continue
        for task, runs in tasks.items():
            base = raw[baseline].get(task)
            if base is None:
                continue
            if len(base) != len(runs):
                raise ValueError(f"paired difference {init} - {baseline} on {task}: "
                                 f"{len(runs)} seeds against {len(base)}")
            for metric in headline_metrics(runs[0]):
                if all(metric in r for r in base):
                    out.setdefault(f"{init} - {baseline}", {}).setdefault(task, {})[metric] = \
                        paired_interval([r[metric] for r in runs], [r[metric] for r in base])
    return out


def primary_task(tasks: list[str], spec: str | None = None) -> str | None:
    """The task key the protocol is judged on (:func:`densessl.recipe.resolve_primary`): by
    default the first linear probe, else the first task, at its largest label fraction."""
    return resolve_primary(spec, tasks)[0] if tasks else None


def interval_unit(pretraining_runs: int, seeds: list[int]) -> str:
    """What one value of the std and the intervals is, in words (``protocol.unit``)."""
    if pretraining_runs > 1:
        each = ("each with its own probe / fine-tuning seed" if len(set(seeds)) > 1
                else f"probe / fine-tuning seed {seeds[0]} for each")
        return f"pretraining runs (n={pretraining_runs}, {each})"
    return f"probe / fine-tuning seeds of one pretraining run (n={len(seeds)})"


#: detection's floor is 0 AP, so its ceiling must clear an absolute bar instead: a supervised
#: detector under this AP50 has not learned to find the objects at the budget it was given
DETECTION_AP50_BAR = 0.3


def _task_check(results: dict, task: str, metric: str) -> tuple[bool | None, list[str]]:
    """(discriminates, warnings) of one task: segmentation-like tasks need the ceiling at
    2 × the floor on ``metric`` on every split; detection needs the ceiling's AP50 at
    :data:`DETECTION_AP50_BAR` on every split."""
    ceiling = results.get(CEILING, {}).get(task)
    if ceiling is None:
        return None, []
    warnings = []
    if task.startswith("detection"):
        keys = [k for k in ceiling if k.split("/")[-1] == "box_AP50"]
        for k in keys:
            if not ceiling[k] >= DETECTION_AP50_BAR:
                warnings.append(
                    f"warning: {task} {k}: the ceiling ({CEILING}, {100 * ceiling[k]:.1f}) is "
                    f"under AP50 {100 * DETECTION_AP50_BAR:.0f}: detection cannot discriminate "
                    "inits at this budget (raise finetune.detection_steps)")
        return (bool(keys) and not warnings), warnings
    floor = results.get(FLOOR, {}).get(task)
    if floor is None:
        return None, []
    keys = [k for k in floor if k.split("/")[-1] == metric and k in ceiling]
    for k in keys:
        if not ceiling[k] >= 2 * floor[k]:
            warnings.append(
                f"warning: {task} {k}: the ceiling ({CEILING}, {100 * ceiling[k]:.1f}) is under "
                f"2 × the floor ({100 * floor[k]:.1f}): the protocol cannot discriminate at this "
                "budget")
    return (bool(keys) and not warnings), warnings


def protocol_check(results: dict, metric: str = "mIoU", primary: str | None = None) -> dict:
    """Can the protocol tell inits apart? Per task key (each label fraction on its own): a
    segmentation task or the probe cannot when the ceiling (the supervised init) scores under
    twice the floor on ``metric``, on any evaluation split; detection cannot when the
    ceiling's AP50 is under :data:`DETECTION_AP50_BAR`. ``discriminates`` is the verdict of
    the ``primary`` task (``finetune.primary``; None: the default rule of
    :func:`densessl.recipe.resolve_primary`)."""
    tasks = list(dict.fromkeys(t for i in inits_of(results) for t in results[i]))
    task, primary_metric = resolve_primary(primary, tasks) if tasks else (None, None)
    check: dict = {"primary": f"{task}/{primary_metric}" if task else None, "ceiling": CEILING,
                   "discriminates": None, "warnings": [], "tasks": {}}
    for name in tasks:
        verdict, warnings = _task_check(results, name, metric)
        if verdict is None:
            continue
        check["tasks"][name] = verdict
        check["warnings"].extend(warnings)
        if name == task:
            check["discriminates"] = verdict
    return check


def build_results(raw: dict[str, dict[str, list[dict]]],
                  floor: dict[str, list[dict]] | None = None,
                  labels: dict[str, str] | None = None, primary: str | None = None,
                  unit: str | None = None) -> dict:
    """Everything results.json holds (see the module docstring) from per-seed runs;
    ``primary``: ``finetune.primary``; ``unit``: :func:`interval_unit` (default: the seeds of
    one pretraining run)."""
    results = aggregate({FLOOR: floor} if floor else {})
    results.update(aggregate(raw))
    results["differences"] = paired_differences(raw)
    for init, baseline in CONTRASTS:
        if init in raw and baseline in raw:
            results["differences"].update(paired_differences(
                {init: raw[init], baseline: raw[baseline]}, baseline))
    n = max((len(runs) for tasks in raw.values() for runs in tasks.values()), default=0)
    results["protocol"] = {**protocol_check(results, primary=primary),
                           "unit": unit or interval_unit(1, list(range(n))),
                           "labels": dict(labels or {})}
    return results


def headline_metrics(cell: dict) -> list[str]:
    """Headline metric names present in a result cell (split prefixes kept, e.g. ``easy/``)."""
    return [k for k in cell if not k.endswith("_std") and k.split("/")[-1] in HEADLINE]


def _fmt(cell: dict, key: str) -> str:
    if key not in cell or math.isnan(cell[key]):
        return "–"
    return f"{100 * cell[key]:.1f} ± {100 * cell.get(key + '_std', 0.0):.1f}"


def _fmt_diff(entry: dict | None) -> str:
    if not entry or math.isnan(entry["mean"]):
        return "–"
    if math.isnan(entry["ci_low"]):
        return f"{100 * entry['mean']:+.1f} (n={entry['n']}, no interval)"
    low, high = 100 * entry["ci_low"], 100 * entry["ci_high"]
    return f"{100 * entry['mean']:+.1f} [{low:+.1f}, {high:+.1f}]"


def results_table(results: dict) -> str:
    """Markdown: one row per (task, headline metric), one column per init (the floor first,
    the supervised init marked as the ceiling), then each paired difference against the
    random init (and :data:`CONTRASTS`, e.g. pretrained - imagenet) with its 95 % interval;
    values in %. Warnings and label use follow."""
    inits = inits_of(results)
    diffs = results.get("differences", {})
    tasks = list(dict.fromkeys(t for init in inits for t in results[init]))
    names = [f"{i} (ceiling)" if i == CEILING else i for i in inits]
    names += [f"{d} [{100 * CONFIDENCE:g} % CI]" for d in diffs]
    lines = ["| task | metric | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for task in tasks:
        first = next(results[i][task] for i in inits if task in results[i])
        for metric in headline_metrics(first):
            cells = [_fmt(results[i].get(task, {}), metric) for i in inits]
            cells += [_fmt_diff(d.get(task, {}).get(metric)) for d in diffs.values()]
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    protocol = results.get("protocol", {})
    notes = []
    if protocol.get("unit"):
        notes.append(f"± std and {100 * CONFIDENCE:g} % CI over {protocol['unit']}")
    if protocol.get("primary"):
        bar = (f"AP50 ≥ {100 * DETECTION_AP50_BAR:.0f}"
               if protocol["primary"].endswith("box_AP50") else "≥ 2 × floor")
        verdict = {True: f"ceiling {bar} on every split",
                   False: f"ceiling not {bar}: it cannot discriminate at this budget",
                   None: "no floor or ceiling to judge it by"}[protocol.get("discriminates")]
        notes.append(f"primary metric: {protocol['primary']} ({verdict})")
    if len(protocol.get("tasks", {})) > 1:  # each task and label fraction on its own
        primary = protocol.get("primary", "") or ""
        notes.append("floor / ceiling check per task: " + "; ".join(
            f"{t}{' (primary)' if primary.startswith(t + '/') else ''}: "
            f"{'discriminates' if ok else 'cannot discriminate'}"
            for t, ok in protocol["tasks"].items()))
    if FLOOR in results:
        notes.append("floor: the majority class at every pixel (no box for detection)")
    if protocol.get("labels"):
        notes.append("labels used: " + "; ".join(f"{k}: {v}"
                                                 for k, v in protocol["labels"].items()))
    text = "\n".join(lines) + "\n"
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    if protocol.get("warnings"):
        text += "\n" + "\n".join(protocol["warnings"]) + "\n"
    return text


def _split_of(metric: str) -> str:
    return metric.rsplit("/", 1)[0] if "/" in metric else ""


def plot_metric(task: str, primary: str | None) -> str:
    """The metric a task is plotted on: the primary's where it applies (its own task, or one
    of the same kind), else mIoU (box_AP50 for detection)."""
    detection = task.startswith("detection")
    if primary:
        key, metric = primary.rsplit("/", 1)
        if key == task or (metric in DETECTION_METRICS) == detection:
            if metric != "mask_mAP" or "mask_rcnn" in task:
                return metric
    return "box_AP50" if detection else "mIoU"


def _cell(results: dict, init: str, task: str, metric: str) -> tuple[float, float]:
    """(mean, 95 % half width) of one init's metric, NaN when absent or from one seed."""
    cell = results.get(init, {}).get(task, {})
    mean = cell.get(metric, math.nan)
    return mean, t_half_width(cell.get(metric + "_std", math.nan), cell.get("n_seeds", 1))


def _grid(n_panels: int, panel_width: float, title: str):
    from matplotlib.figure import Figure

    cols = min(3, n_panels)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(cols * panel_width, rows * 3.4 + 0.8), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        fig.delaxes(ax)
    fig.suptitle(title, fontsize=10)
    return fig, list(axes[:n_panels])


def _legend(fig, axes) -> None:
    handles: dict = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center",
               ncol=min(6, len(handles)), fontsize=8)


def _splits(results: dict, inits: list[str]) -> list[str]:
    return list(dict.fromkeys(_split_of(m) for i in inits for cell in results[i].values()
                              for m in headline_metrics(cell)))


def results_figure(results: dict):
    """The figure of results.png (a matplotlib Figure): one panel per evaluation split, one
    group per task at its largest label fraction on :func:`plot_metric`, the floor (dotted)
    and the ceiling (dashed) as lines over the group, each other init's mean with its 95 %
    t-interval over the seeds (no bar from one seed)."""
    inits = inits_of(results)
    protocol = results.get("protocol", {})
    tasks = list(dict.fromkeys(t for i in inits for t in results[i]))
    largest: dict[str, str] = {}
    for t in tasks:
        base, pct = split_task_key(t)
        if base not in largest or pct > split_task_key(largest[base])[1]:
            largest[base] = t
    tasks = list(largest.values())
    others = [i for i in inits if i not in (FLOOR, CEILING)]
    splits = _splits(results, inits) or [""]
    width = max(3.8, 1.3 * len(tasks) + 1.4)
    fig, axes = _grid(len(splits), width, f"mean and {100 * CONFIDENCE:g} % interval over "
                      f"{protocol.get('unit', 'seeds')}")
    for ax, split in zip(axes, splits):
        labels = []
        for g, task in enumerate(tasks):
            metric = plot_metric(task, protocol.get("primary"))
            name = f"{split}/{metric}" if split else metric
            base, pct = split_task_key(task)
            labels.append(f"{base.replace('/', chr(10))} @{pct:g}%\n{metric}")
            for init, style, label in ((FLOOR, ":", FLOOR), (CEILING, "--",
                                                             f"ceiling ({CEILING})")):
                value = _cell(results, init, task, name)[0]
                if math.isfinite(value):
                    ax.hlines(100 * value, g - 0.4, g + 0.4, colors="0.3", linestyles=style,
                              label=label)
            for j, init in enumerate(others):
                mean, half = _cell(results, init, task, name)
                if not math.isfinite(mean):
                    continue
                x = g + (j - (len(others) - 1) / 2) * 0.6 / max(1, len(others))
                ax.errorbar(x, 100 * mean, yerr=100 * half if math.isfinite(half) else None,
                            fmt="o", color=f"C{j}", capsize=3, label=init)
        ax.set_xticks(range(len(tasks)), labels, fontsize=8)
        ax.set_xlim(-0.6, len(tasks) - 0.4)
        ax.set_ylabel("score (%)")
        ax.set_title(split or "test", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    _legend(fig, axes)
    return fig


def label_efficiency_figure(results: dict):
    """Score against label fraction (log x), one panel per task × split, one line per init
    with its 95 % interval (the floor dotted, the ceiling dashed); None when no task has
    several fractions."""
    inits = inits_of(results)
    protocol = results.get("protocol", {})
    by_base: dict[str, list[str]] = {}
    for t in dict.fromkeys(t for i in inits for t in results[i]):
        by_base.setdefault(split_task_key(t)[0], []).append(t)
    curves = {b: sorted(ts, key=lambda t: split_task_key(t)[1])
              for b, ts in by_base.items() if len(ts) > 1}
    if not curves:
        return None
    others = [i for i in inits if i not in (FLOOR, CEILING)]  # colours as in results.png
    splits = _splits(results, inits) or [""]
    panels = [(b, s) for b in curves for s in splits]
    fig, axes = _grid(len(panels), 4.2, f"label efficiency: mean and {100 * CONFIDENCE:g} % "
                      f"interval over {protocol.get('unit', 'seeds')}")
    for ax, (base, split) in zip(axes, panels):
        keys = curves[base]
        metric = plot_metric(keys[-1], protocol.get("primary"))
        name = f"{split}/{metric}" if split else metric
        x = [split_task_key(k)[1] for k in keys]
        for init in inits:
            cells = [_cell(results, init, k, name) for k in keys]
            if not any(math.isfinite(m) for m, _ in cells):
                continue
            means = [100 * m for m, _ in cells]
            if init == FLOOR:
                ax.plot(x, means, color="0.3", ls=":", label=FLOOR)
                continue
            style = (dict(color="0.3", ls="--", label=f"ceiling ({CEILING})") if init == CEILING
                     else dict(color=f"C{others.index(init)}", label=init))
            ax.errorbar(x, means, yerr=[100 * h if math.isfinite(h) else 0.0 for _, h in cells],
                        marker="o", capsize=3, **style)
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{p:g}%" for p in x])
        ax.minorticks_off()
        ax.set_xlabel("labels used")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(f"{base}{' — ' + split if split else ''}", fontsize=10)
        ax.grid(alpha=0.3)
    _legend(fig, axes)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    return path


def plot_results(results: dict, path: str | Path) -> Path:
    """Write :func:`results_figure` to ``path`` (atomically)."""
    return _save(results_figure(results), path)


def plot_label_efficiency(results: dict, path: str | Path) -> Path | None:
    """Write :func:`label_efficiency_figure` to ``path``; without one, remove a stale file
    and return None."""
    fig = label_efficiency_figure(results)
    if fig is None:
        Path(path).unlink(missing_ok=True)
        return None
    return _save(fig, path)


def write_report(results: dict, out: str | Path, header: str = "") -> str:
    """Write ``results.json``, ``results.md``, ``results.png`` and (with several label
    fractions) ``label_efficiency.png`` into ``out``; returns the markdown (for printing)."""
    out = Path(out)
    write_json(out / "results.json", results)
    table = results_table(results)
    text = (header + "\n" if header else "") + table
    write_text(out / "results.md", text)
    plot_results(results, out / "results.png")
    plot_label_efficiency(results, out / "label_efficiency.png")
    return text
