"""Results: mean ± std over seeds, the floor, the ceiling and paired differences with their
95 % intervals → results.json, a markdown table (printed) and a bar plot.

``results.json``::

    {"floor":      {"<task>": {"<metric>": v, "<metric>_std": 0.0, "n_seeds": 1}},
     "<init>":     {"<task>": {"<metric>": mean, "<metric>_std": std, "n_seeds": n}}, ...
     "differences": {"<init> - random": {"<task>": {"<metric>": {"mean", "std", "n",
                                                               "ci_low", "ci_high"}}},
                     "pretrained - imagenet": {...}},
     "protocol":   {"primary": "<task>/<metric>", "ceiling": "supervised",
                    "discriminates": true | false | null, "warnings": [...],
                    "labels": {"<init>": "what labels it used"}}}

``<metric>_std`` is the spread over the *fine-tuning / probe* seeds of one encoder (one
pretraining run). A sweep's ``summary.csv`` (:mod:`densessl.sweep.report`) has it averaged over
the sweep's seeds, next to ``<metric>:std``, the spread over those *sweep* seeds (pretraining
runs); both come from :func:`mean_std`.

Task keys look like ``segmentation/fpn@10%`` (see :func:`densessl.eval.finetune.task_runs`).
``floor`` is what predicting the majority class everywhere (no box, for detection) scores,
shaped like an init. A difference pairs the i-th seed of an init with the i-th seed of the
random init; its interval is Student's t over those paired differences. With an ``imagenet``
init, ``pretrained - imagenet`` (does domain pretraining beat starting from ImageNet?) follows,
paired the same way (:data:`CONTRASTS`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from scipy import stats

from densessl.io import atomic_write, write_json, write_text

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
    half = (float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
            if n > 1 else math.nan)
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


def primary_task(tasks: list[str]) -> str | None:
    """The task the protocol is judged on: the first linear probe, else the first task."""
    return next((t for t in tasks if t.startswith("linear_probe")), tasks[0] if tasks else None)


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


def protocol_check(results: dict, metric: str = "mIoU") -> dict:
    """Can the protocol tell inits apart? Per task: a segmentation task or the probe cannot
    when the ceiling (the supervised init) scores under twice the floor on ``metric``, on any
    evaluation split; detection cannot when the ceiling's AP50 is under
    :data:`DETECTION_AP50_BAR`. ``discriminates`` is the primary task's verdict."""
    tasks = list(dict.fromkeys(t for i in inits_of(results) for t in results[i]))
    task = primary_task(tasks)
    # detection is judged on AP50 against an absolute bar, not on a floor's mIoU
    primary_metric = "box_AP50" if task and task.startswith("detection") else metric
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
                  labels: dict[str, str] | None = None) -> dict:
    """Everything results.json holds (see the module docstring) from per-seed runs."""
    results = aggregate({FLOOR: floor} if floor else {})
    results.update(aggregate(raw))
    results["differences"] = paired_differences(raw)
    for init, baseline in CONTRASTS:
        if init in raw and baseline in raw:
            results["differences"].update(paired_differences(
                {init: raw[init], baseline: raw[baseline]}, baseline))
    results["protocol"] = {**protocol_check(results), "labels": dict(labels or {})}
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
    if protocol.get("primary"):
        bar = (f"AP50 ≥ {100 * DETECTION_AP50_BAR:.0f}"
               if protocol["primary"].endswith("box_AP50") else "≥ 2 × floor")
        verdict = {True: f"ceiling {bar} on every split",
                   False: f"ceiling not {bar}: it cannot discriminate at this budget",
                   None: "no floor or ceiling to judge it by"}[protocol.get("discriminates")]
        notes.append(f"primary metric: {protocol['primary']} ({verdict})")
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


def plot_results(results: dict, path: str | Path) -> Path:
    """Grouped bars (one group per task × headline metric, one bar per init), seed std as
    error bars. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inits = inits_of(results)
    tasks = list(dict.fromkeys(t for init in inits for t in results[init]))
    groups = [(t, m) for t in tasks
              for m in headline_metrics(next(results[i][t] for i in inits if t in results[i]))]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(groups) * max(1, len(inits)) / 2), 3.6))
    width = 0.8 / max(1, len(inits))
    x = np.arange(len(groups))
    for j, init in enumerate(inits):
        means = [100 * results[init].get(t, {}).get(m, np.nan) for t, m in groups]
        stds = [100 * results[init].get(t, {}).get(m + "_std", 0.0) for t, m in groups]
        ax.bar(x + (j - (len(inits) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
               label=init)
    ax.set_xticks(x, [f"{t}\n{m}" for t, m in groups], fontsize=7)
    ax.set_ylabel("score (%)")
    ax.legend(fontsize=8)
    ax.set_title("downstream results by encoder init (mean ± std over seeds)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def write_report(results: dict, out: str | Path, header: str = "") -> str:
    """Write ``results.json``, ``results.md`` and ``results.png`` into ``out``; returns the
    markdown (for printing)."""
    out = Path(out)
    write_json(out / "results.json", results)
    table = results_table(results)
    text = (header + "\n" if header else "") + table
    write_text(out / "results.md", text)
    plot_results(results, out / "results.png")
    return text
