"""Results: mean ± std over seeds → results.json, a markdown table and a bar plot.

``results.json`` is ``{"<init>": {"<task>": {"<metric>": mean, "<metric>_std": std}}}`` with
task keys like ``segmentation/fpn@10%`` (see :func:`densessl.eval.finetune.task_runs`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from densessl.io import atomic_write, write_json, write_text

HEADLINE = ("mIoU", "box_mAP", "box_AP50", "mask_mAP")


def aggregate(raw: dict[str, dict[str, list[dict]]]) -> dict:
    """Per-seed metric dicts → mean and (sample) std per metric; std is 0 for one seed."""
    results: dict = {}
    for init, tasks in raw.items():
        for task, runs in tasks.items():
            cell = results.setdefault(init, {}).setdefault(task, {})
            for key in runs[0]:
                values = np.array([r[key] for r in runs], dtype=float)
                ok = values[~np.isnan(values)]
                cell[key] = float(ok.mean()) if len(ok) else math.nan
                cell[f"{key}_std"] = float(ok.std(ddof=1)) if len(ok) > 1 else 0.0
            cell["n_seeds"] = len(runs)
    return results


def headline_metrics(cell: dict) -> list[str]:
    """Headline metric names present in a result cell (split prefixes kept, e.g. ``easy/``)."""
    return [k for k in cell if not k.endswith("_std") and k.split("/")[-1] in HEADLINE]


def _fmt(cell: dict, key: str) -> str:
    if key not in cell or math.isnan(cell[key]):
        return "–"
    return f"{100 * cell[key]:.1f} ± {100 * cell.get(key + '_std', 0.0):.1f}"


def results_table(results: dict) -> str:
    """Markdown: one row per (task, headline metric), one column per init; values in %."""
    inits = list(results)
    tasks = list(dict.fromkeys(t for init in inits for t in results[init]))
    lines = ["| task | metric | " + " | ".join(inits) + " |",
             "|---|---|" + "---|" * len(inits)]
    for task in tasks:
        first = next(results[i][task] for i in inits if task in results[i])
        for metric in headline_metrics(first):
            cells = [_fmt(results[i].get(task, {}), metric) for i in inits]
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_results(results: dict, path: str | Path) -> Path:
    """Grouped bars (one group per task × headline metric, one bar per init), seed std as
    error bars. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inits = list(results)
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
