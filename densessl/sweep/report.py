"""A sweep's results table, its mean ± std summary over seeds, and its plots.

``results.csv``: one row per cell — ``cell_id``, ``status``, ``error``, ``seconds``, the grid
keys, then every metric (``<init>/<task>/<metric>``, ``gap/...`` = pretrained − random,
``pretrain/...``). ``summary.csv`` / ``summary.md``: rows grouped by every grid key except the
``over`` keys (seeds), each metric as mean and sample std (0 with one seed) over the ok rows.
Two spreads, not one: ``<metric>:std`` is the std over the sweep's seeds (separate pretraining
runs), while a ``<metric>_std`` column (from each cell's ``results.json``) is the std over that
cell's fine-tuning / probe seeds (its pretraining runs with ``finetune.pretrain_seeds``: the
cell's ``protocol.unit``), so its summary value is that spread averaged over the sweep's seeds.
Both use :func:`densessl.eval.report.mean_std`.
``plots/<metric>.png``: the metric against the ``x`` grid key, one line per combination of the
other grid keys (e.g. per noise kind), seed std as error bars, pretrained solid and the baseline
init dashed in the same colour, so the pretrained-vs-random gap is read off one plot.
``plots/robust_<metric>.png`` (when ``loss.robust.kind`` is a grid key): grouped bars, one
group per combination of the other grid keys (noise kind and amount), one bar per
``loss.robust.kind`` value, mean ± seed std: robust vs plain InfoNCE for each noise kind.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from densessl.eval.report import HEADLINE, mean_std
from densessl.io import atomic_write, write_text

FIXED = ("cell_id", "status", "error", "seconds")
#: pretraining monitors shown in summary.md next to the headline metrics when a cell has them:
#: how well loss.robust.kind's down-weighted cells match the true noisy pairs (issue #18)
MONITORS = ("pretrain/dense_robust_fraction", "pretrain/dense_robust_precision",
            "pretrain/dense_robust_recall", "pretrain/dense_robust_cell_precision",
            "pretrain/dense_robust_cell_recall", "pretrain/dense_robust_cell_noisy_share",
            "pretrain/dense_robust_rank_auroc")
#: the grid key whose values the robust plot compares (``loss.robust``: the flat key of
#: sweeps run before the objectives' loss sections, whose results.csv still name it)
ROBUST_KEYS = ("loss.robust.kind", "loss.robust")


def robust_key(group_keys: list[str]) -> str | None:
    """The robust grid key among ``group_keys``, if any."""
    return next((k for k in ROBUST_KEYS if k in group_keys), None)


def as_text(value: Any) -> str:
    """CSV text of a value: strings as they are, anything else as JSON (0.5, true, [1, 2])."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return json.dumps(value)


def read_results(path: str | Path) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_results(path: str | Path, rows: list[dict], keys: list[str]) -> Path:
    """Rewrite the whole table atomically (temp file + os.replace): never half a row."""
    metrics = sorted({k for r in rows for k in r} - set(FIXED) - set(keys))
    columns = [*FIXED, *keys, *metrics]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: as_text(v) for k, v in row.items()})
    return write_text(path, buffer.getvalue())


def _number(text: Any) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def summarize(rows: Iterable[dict], keys: list[str], over: Iterable[str] = ("seed",)
              ) -> list[dict[str, Any]]:
    """Group ok rows by the grid keys not in ``over``; mean, sample std and count per metric.

    Returns one dict per group: the group's key texts, ``n`` (rows), and for every metric
    ``<metric>`` (mean) and ``<metric>:std`` (over the sweep seeds, see the module docstring).
    NaN values are left out of their metric's mean.
    """
    over = set(over)
    group_keys = [k for k in keys if k not in over]
    skip = set(FIXED) | set(keys)
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("status") != "ok":
            continue
        groups.setdefault(tuple(as_text(row.get(k, "")) for k in group_keys), []).append(row)
    summary = []
    for group, members in groups.items():
        entry: dict[str, Any] = dict(zip(group_keys, group))
        entry["n"] = len(members)
        metrics = sorted({k for r in members for k in r} - skip)
        for metric in metrics:
            entry[metric], entry[f"{metric}:std"] = mean_std(_number(r.get(metric))
                                                             for r in members)
        summary.append(entry)
    return summary


def headline(summary: list[dict], init: str = "pretrained") -> list[str]:
    """The ``<init>/<task>/<metric>`` means whose metric is a headline one (mIoU, mAP...)."""
    names = {k for entry in summary for k in entry}
    return sorted(k for k in names if k.startswith(f"{init}/") and not k.endswith(":std")
                  and k.rsplit("/", 1)[-1] in HEADLINE)


def summary_markdown(summary: list[dict], group_keys: list[str], metrics: list[str]) -> str:
    """Markdown table: group keys, n, and each metric as mean ± std (values in %)."""
    lines = ["| " + " | ".join([*group_keys, "n", *metrics]) + " |",
             "|" + "---|" * (len(group_keys) + 1 + len(metrics))]
    for entry in summary:
        cells = [str(entry.get(k, "")) for k in group_keys] + [str(entry["n"])]
        for metric in metrics:
            mean, std = entry.get(metric, math.nan), entry.get(f"{metric}:std", math.nan)
            cells.append("–" if math.isnan(mean) else f"{100 * mean:.1f} ± {100 * std:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _axes_groups(line_keys: list[str], x: str | None, lines: dict) -> dict[str, list]:
    """Lines split by unit of ``x``: noise kinds in pixels apart from kinds in fractions."""
    if x != "noise.amount" or "noise.kind" not in line_keys:
        return {"": list(lines)}
    from densessl.pairs.noise import KIND_UNITS

    at = line_keys.index("noise.kind")
    groups: dict[str, list] = {}
    for line in lines:
        groups.setdefault(KIND_UNITS.get(line[at], "fraction"), []).append(line)
    return groups


def _save(fig, path: Path) -> Path:
    """Lay out, write atomically (creating the folder) and close a report figure; a plot that
    cannot be written is one OutputError and leaves no half-written file."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format=path.suffix[1:]))
    finally:
        plt.close(fig)
    return path


def plot_metric(summary: list[dict], group_keys: list[str], x: str | None, metric: str,
                baseline: str, path: Path) -> Path:
    """One PNG: ``metric`` vs ``x`` with error bars, one line per other-key combination;
    the ``baseline`` init dashed. Rows with ``noise.kind: none`` start every kind's line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    line_keys = [k for k in group_keys if k != x]
    base_metric = f"{baseline}/" + metric.partition("/")[2]
    lines: dict[tuple, list[dict]] = {}
    clean = []
    for entry in summary:
        line = tuple(entry[k] for k in line_keys)
        if x is not None and "noise.kind" in line_keys and entry["noise.kind"] == "none":
            clean.append((line, entry))  # zero noise: the start of every kind's curve
            continue
        lines.setdefault(line, []).append(entry)
    kind_at = line_keys.index("noise.kind") if "noise.kind" in line_keys else None
    for line, points in lines.items():
        for other, entry in clean:
            same_rest = all(a == b for i, (a, b) in enumerate(zip(line, other)) if i != kind_at)
            if same_rest:
                points.append({**entry, x: "0"})
    axes_groups = _axes_groups(line_keys, x, lines)
    fig, axes = plt.subplots(1, len(axes_groups), figsize=(5.2 * len(axes_groups), 3.8),
                             squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (unit, members) in zip(axes[0], axes_groups.items()):
        for j, line in enumerate(members):
            points = lines[line]
            if x is not None:
                points = sorted(points, key=lambda e: _number(e[x]))
                xs = [_number(e[x]) for e in points]
            else:
                xs = [j] * len(points)
            label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in zip(line_keys, line))
            colour = colours[j % len(colours)]
            for name, style in ((metric, "-o"), (base_metric, "--s")):
                ys = [100 * e.get(name, math.nan) for e in points]
                errs = [100 * e.get(f"{name}:std", 0.0) for e in points]
                if all(math.isnan(y) for y in ys):
                    continue
                suffix = "" if name == metric else f" ({baseline})"
                ax.errorbar(xs, ys, yerr=errs, fmt=style, color=colour, capsize=3,
                            label=(label or metric.split("/")[0]) + suffix,
                            alpha=1.0 if name == metric else 0.6)
        ax.set_xlabel(f"{x} ({unit})" if unit else (x or "cell"))
        ax.set_ylabel(f"{metric.partition('/')[2]} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"pretrained (solid) vs {baseline} init (dashed), mean ± std", fontsize=9)
    return _save(fig, path)


def robust_bars(summary: list[dict], group_keys: list[str], metric: str
                ) -> tuple[list[str], dict[str, list[tuple[float, float]]]]:
    """What :func:`plot_robust` draws: the group labels (every combination of the grid keys
    other than ``loss.robust.kind``, e.g. ``kind=mismatch, amount=0.5``, in first-seen order) and,
    per ``loss.robust.kind`` value (first-seen order), ``(mean, std)`` of ``metric`` in each group
    (NaN where the sweep has no such cell)."""
    key = robust_key(group_keys)
    others = [k for k in group_keys if k != key]
    groups: list[str] = []
    values: dict[str, dict[str, tuple[float, float]]] = {}
    for entry in summary:
        group = ", ".join(f"{k.split('.')[-1]}={entry.get(k, '')}" for k in others) or metric
        if group not in groups:
            groups.append(group)
        mean = entry.get(metric, math.nan)
        values.setdefault(str(entry.get(key, "")), {})[group] = (
            mean, entry.get(f"{metric}:std", 0.0))
    return groups, {robust: [per.get(g, (math.nan, math.nan)) for g in groups]
                    for robust, per in values.items()}


def plot_robust(summary: list[dict], group_keys: list[str], metric: str, path: Path) -> Path:
    """One PNG: ``metric`` (%) as grouped bars, one group per noise setting, one bar per
    ``loss.robust.kind`` value, seed std as error bars (:func:`robust_bars`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups, series = robust_bars(summary, group_keys, metric)
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(groups) * max(len(series), 1) / 2), 3.8))
    for j, (robust, points) in enumerate(series.items()):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(groups))]
        ax.bar(xs, [100 * m for m, _ in points], width,
               yerr=[100 * (0.0 if math.isnan(s) else s) for _, s in points], capsize=3,
               label=f"robust={robust}")
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel(f"{metric.partition('/')[2] or metric} (%)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    ax.set_title(f"{metric}: loss.robust.kind per noise setting, mean ± std over seeds", fontsize=8)
    return _save(fig, path)


def write_summary(out: Path, rows: list[dict], keys: list[str], report: dict) -> list[Path]:
    """``summary.csv``, ``summary.md`` and one plot per reported metric into ``out``."""
    over = report.get("over", ["seed"])
    group_keys = [k for k in keys if k not in over]
    summary = summarize(rows, keys, over)
    paths = []
    metric_names = sorted({k for e in summary for k in e} - set(group_keys) - {"n"})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*group_keys, "n", *metric_names], restval="",
                            lineterminator="\n")
    writer.writeheader()
    for entry in summary:
        writer.writerow({k: as_text(v) for k, v in entry.items()})
    paths.append(write_text(out / "summary.csv", buffer.getvalue()))
    plotted = report.get("metrics") or headline(summary)
    baseline = report.get("baseline", "random")
    others = [f"{p}/{m.partition('/')[2]}" for m in plotted for p in (baseline, "gap")]
    shown = [m for m in [*plotted, *others, *MONITORS] if any(m in e for e in summary)]
    paths.append(write_text(out / "summary.md", summary_markdown(summary, group_keys, shown)))
    x = report.get("x")
    x = x if x in group_keys else None
    for metric in plotted:
        if summary:
            name = metric.replace("/", "_").replace("@", "_").replace("%", "pct")
            paths.append(plot_metric(summary, group_keys, x, metric,
                                     report.get("baseline", "random"),
                                     out / "plots" / f"{name}.png"))
            if robust_key(group_keys):
                paths.append(plot_robust(summary, group_keys, metric,
                                         out / "plots" / f"robust_{name}.png"))
    if robust_key(group_keys):
        # how well each robust form finds the wrong cells (precision / recall per cell)
        for monitor in MONITORS[1:]:
            if any(monitor in e for e in summary):
                paths.append(plot_robust(summary, group_keys, monitor, out / "plots" /
                                         f"robust_{monitor.replace('/', '_')}.png"))
    return paths
