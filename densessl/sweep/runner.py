"""``densessl sweep SWEEP.yaml --out DIR``: a grid of pretrain → fine-tune cells, resumable.

A sweep file names a base recipe, overrides for every cell (``set``) and a ``grid`` over any
dotted recipe keys — a mapping (the cartesian product) or a list of mappings (the union of
their products, e.g. one block per noise kind)::

    name: noise_robustness
    base: ../noisy_seg.yaml            # relative to the sweep file, or 'demo'
    set: {train.max_steps: 20}
    grid:
      noise.kind: [mismatch, partial_change]
      noise.amount: [0.0, 0.5, 1.0]
      seed: [0, 1]
    report: {x: noise.amount, over: [seed]}

Every cell is checked as a recipe before anything runs. Each cell works in its own folder
``DIR/cells/<id>/`` (wiped when it starts, so an interrupted cell is redone from scratch) and,
when it ends, one row — its grid values and every metric, or its error — goes into
``DIR/results.csv``, which is rewritten whole through a temporary file and ``os.replace``: a
crash at any moment leaves either the old or the new table, never half a row. Rerunning the
same command skips the cells with an ``ok`` row and retries the others.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from densessl.errors import DensesslError, OutputError, RecipeError
from densessl.io import make_folder, write_text, writing
from densessl.models.weights import read_side_json
from densessl.recipe import (
    apply_overrides,
    demo_recipe_path,
    migrate_flat_loss,
    parse_recipe,
    read_recipe_dict,
)
from densessl.sweep.report import read_results, write_results, write_summary
from densessl.workflows.validation import validate_recipe

CellFn = Callable[[dict, Path], dict[str, float]]


class ReportSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    x: str | None = Field("noise.amount", description="grid key on the plots' x axis")
    over: list[str] = Field(["seed"], description="grid keys averaged over (mean ± std)")
    metrics: list[str] = Field([], description="metrics to plot; default: every pretrained "
                               "headline metric (mIoU, box_mAP, ...)")
    baseline: str = Field("random", description="init drawn dashed next to 'pretrained'")


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "sweep"
    base: str = Field(..., description="base recipe: a YAML path (relative to the sweep file) "
                      "or 'demo'")
    set: dict[str, Any] = Field({}, description="dotted recipe keys set in every cell")
    grid: dict[str, list] | list[dict[str, list]]
    report: ReportSpec = ReportSpec()


def _spec_error(exc: ValidationError, source: str) -> str:
    error = exc.errors()[0]
    key = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        model = ReportSpec if error["loc"][0] == "report" else SweepSpec
        return (f"sweep {source}: {key}: unknown key (valid keys: "
                f"{', '.join(model.model_fields)})")
    return f"sweep {source}: {key}: {error['msg']}"


def load_sweep(path: str | Path | dict, overrides: list[str] | None = None
               ) -> tuple[SweepSpec, dict, Path]:
    """Read and validate a sweep. Returns (spec, base recipe dict with ``set`` and
    ``overrides`` applied, folder that relative paths start from)."""
    if isinstance(path, dict):
        raw, source, folder = path, "<dict>", Path.cwd()
    else:
        path = Path(path)
        raw = read_recipe_dict(path, kind="sweep")
        source, folder = str(path), path.parent
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(_spec_error(exc, source)) from None
    if spec.base == "demo":
        base_path = demo_recipe_path()
    else:
        base_path = Path(spec.base) if Path(spec.base).is_absolute() else folder / spec.base
    base = read_recipe_dict(base_path)
    sets = [f"{k}={json.dumps(v)}" for k, v in spec.set.items()]
    base = apply_overrides(base, sets + list(overrides or []))
    return spec, base, folder


def expand_grid(grid: dict[str, list] | list[dict[str, list]]) -> list[dict[str, Any]]:
    """Cells of a grid: the product of a mapping, or the union of products of a list."""
    blocks = [grid] if isinstance(grid, dict) else grid
    cells: list[dict] = []
    for block in blocks:
        keys = list(block)
        for values in itertools.product(*(block[k] for k in keys)):
            cell = dict(zip(keys, values))
            if cell not in cells:
                cells.append(cell)
    return cells


def grid_keys(grid) -> list[str]:
    blocks = [grid] if isinstance(grid, dict) else grid
    return list(dict.fromkeys(k for block in blocks for k in block))


def cell_id(params: dict, recipe: dict) -> str:
    """Stable short id of a cell from its grid values *and* its resolved recipe, so a cell
    run under other settings (an edited ``set``, ``--set``) is never mistaken for this one."""
    text = json.dumps({"params": params, "recipe": recipe}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def plan(sweep: str | Path | dict, overrides: list[str] | None = None
         ) -> tuple[SweepSpec, list[tuple[dict, dict, str]]]:
    """Validate a sweep and resolve every cell: (spec, [(params, recipe dict, cell id)])."""
    spec, base, _ = load_sweep(sweep, overrides)
    source = str(sweep) if not isinstance(sweep, dict) else "<dict>"
    cells = []
    for params in expand_grid(spec.grid):
        recipe = cell_recipe(base, params, f"sweep {source}")
        cells.append((params, recipe, cell_id(params, recipe)))
    return spec, cells


def cell_recipe(base: dict, params: dict, source: str) -> dict:
    """The validated, fully resolved recipe dict of one cell."""
    data = apply_overrides(json.loads(json.dumps(base)),
                           [f"{k}={json.dumps(v)}" for k, v in params.items()])
    where = f"{source} cell {json.dumps(params)}"
    recipe = parse_recipe(data, where)
    # every name and rule a stage would refuse (registries, options, smp's input size), before
    # any cell pretrains: run_cell then skips run()'s own check
    validate_recipe(recipe, where)
    return recipe.model_dump(mode="json")


def flatten_results(results: dict, prefix: str = "") -> dict[str, float]:
    """``{"init": {"task": {"metric": v}}}`` → ``{"init/task/metric": v}`` (numbers only)."""
    flat: dict[str, float] = {}
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_results(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def run_cell(recipe: dict, cell_dir: Path) -> dict[str, float]:
    """The real cell: :func:`densessl.workflows.experiment.run` (pretrain → fine-tune every init) in
    ``cell_dir``; returns every downstream metric, the pretrained − random gaps and the final
    pretraining monitors."""
    from densessl.workflows.experiment import run

    log_path = cell_dir / "log.txt"
    with writing(log_path):
        log_file = open(log_path, "a")  # noqa: SIM115 - closed below

    def log(*args) -> None:
        with writing(log_path):  # a full disk: one OutputError naming log.txt
            print(*args, file=log_file, flush=True)

    try:
        results = run(recipe, cell_dir, log=log, validate=False)  # plan() validated it
    finally:
        log_file.close()
    metrics = flatten_results(results)
    for key, value in list(metrics.items()):
        init, _, rest = key.partition("/")
        other = metrics.get(f"random/{rest}")
        if init == "pretrained" and other is not None and not rest.endswith(("_std", "n_seeds")):
            metrics[f"gap/{rest}"] = value - other
    pretrain_metrics = read_side_json(cell_dir / "pretrain" / "metrics.json") or {}
    metrics.update(flatten_results(pretrain_metrics.get("final", {}), "pretrain/"))
    for key in ("pairs_per_s", "dense_query_cells_per_image"):  # run-level figures
        metrics[f"pretrain/{key}"] = float(pretrain_metrics.get(key, float("nan")))
    return metrics


def execute_cell(cell_fn: CellFn, recipe: dict, params: dict, cell_dir: Path) -> dict:
    """Run one cell in a clean folder and return its row; an exception becomes a ``failed``
    row (interrupts such as KeyboardInterrupt still stop the sweep). An output that cannot be
    written (:class:`OutputError`: a full disk, a read-only folder) stops the sweep instead:
    every later cell would fail the same way; rerunning resumes."""
    if cell_dir.exists():
        shutil.rmtree(cell_dir)  # leftovers of an interrupted attempt
    make_folder(cell_dir)
    write_text(cell_dir / "cell.json", json.dumps({"params": params, "recipe": recipe},
                                                  indent=2))
    row: dict[str, Any] = {"cell_id": cell_dir.name, **params}
    start = time.perf_counter()
    try:
        metrics = cell_fn(recipe, cell_dir)
        row.update(status="ok", error="", **{k: float(v) for k, v in metrics.items()})
    except OutputError:
        raise
    except Exception as exc:  # noqa: BLE001 — a failed cell must not stop the sweep
        message = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
        write_text(cell_dir / "error.txt", traceback.format_exc())
        row.update(status="failed", error=message)
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _saved_recipe(cell_dir: Path) -> tuple[dict, dict] | None:
    """(params, recipe as it resolves today) of a finished cell's ``cell.json``; None where it
    is unreadable or no longer a valid recipe."""
    try:
        saved = json.loads((cell_dir / "cell.json").read_text())
        recipe = parse_recipe(migrate_flat_loss(saved["recipe"]), str(cell_dir))
    except (OSError, ValueError, KeyError, TypeError, RecipeError):
        return None
    return saved.get("params", {}), recipe.model_dump(mode="json")


def adopt_saved_cells(out: Path, cells: list[tuple[dict, dict, str]], rows: dict[str, dict],
                      keys: list[str], log: Callable[[str], None] = print) -> int:
    """Keep the finished cells of this folder whose id changed only because the recipe format
    did (a sweep run before the loss sections moved): a saved cell whose recipe, migrated and
    resolved today, equals a planned cell's recipe computed exactly that cell. Its folder is
    renamed to the new id, its ``cell.json`` rewritten and its row re-keyed with the new grid
    values; ``rows`` is updated in place. Returns how many cells were adopted."""
    planned = {i: (p, r) for p, r, i in cells}
    waiting = {json.dumps(r, sort_keys=True): i for i, (p, r) in planned.items()
               if rows.get(i, {}).get("status") != "ok"}
    adopted = 0
    for old_id, row in list(rows.items()):
        cell_dir = out / "cells" / old_id
        if old_id in planned or row.get("status") != "ok" or not cell_dir.is_dir():
            continue
        saved = _saved_recipe(cell_dir)
        new_id = saved and waiting.pop(json.dumps(saved[1], sort_keys=True), None)
        if not new_id:
            continue
        params, recipe = planned[new_id]
        target = out / "cells" / new_id
        if target.exists():
            shutil.rmtree(target)  # an interrupted attempt at the new id
        cell_dir.rename(target)
        write_text(target / "cell.json", json.dumps({"params": params, "recipe": recipe},
                                                    indent=2))
        metrics = {k: v for k, v in row.items() if k not in saved[0] and k != "cell_id"}
        del rows[old_id]
        rows[new_id] = {"cell_id": new_id, **params, **metrics}
        adopted += 1
    if adopted:
        write_results(out / "results.csv", list(rows.values()), keys)
        log(f"  kept {adopted} finished cell(s) saved under an earlier recipe format "
            "(same recipe once migrated)")
    return adopted


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies, so a killed sweep leaves no workers
    holding memory (elsewhere a no-op)."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_init(threads: int, gpu_ids=None) -> None:
    """Each worker process takes its share of CPU threads and, when there are several GPUs,
    one GPU of its own (before anything initialises CUDA)."""
    _die_with_parent()
    if gpu_ids is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_ids.get())
    import torch

    torch.set_num_threads(threads)


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def numerics(jobs: int) -> dict:
    """What changes a cell's numbers besides its recipe: CPU threads per cell (set by --jobs),
    the devices and the torch build."""
    import torch

    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else torch.get_num_threads()
    return {"jobs": jobs, "cpu_threads_per_cell": threads, "gpus": visible_gpus(),
            "torch": str(torch.__version__)}


def _check_numerics(out: Path, jobs: int) -> None:
    """Refuse to add cells to a sweep whose finished cells ran with other numerics."""
    path = out / "numerics.json"
    now = numerics(jobs)
    if path.is_file() and any(r.get("status") == "ok" for r in read_results(out / "results.csv")):
        before = json.loads(path.read_text())
        changed = [f"{k}: {before.get(k)!r} → {v!r}" for k, v in now.items()
                   if before.get(k) != v]
        if changed:
            raise DensesslError(f"sweep {out}: its finished cells ran with other settings "
                                f"({'; '.join(changed)}); a cell's numbers depend on them, so "
                                f"rerun with --jobs {before.get('jobs')} on the same machine "
                                "or use another --out")
    write_text(path, json.dumps(now, indent=2) + "\n")


def run_sweep(sweep: str | Path | dict, out: str | Path, jobs: int = 1,
              overrides: list[str] | None = None, cell_fn: CellFn = run_cell,
              log: Callable[[str], None] = print) -> list[dict]:
    """Run every cell of ``sweep`` not yet finished in ``out``; returns the result rows.

    ``jobs`` > 1 runs cells in that many processes (each with a share of the CPU threads and,
    with several GPUs, one GPU per process).
    ``cell_fn(recipe_dict, cell_dir) -> metrics`` is the per-cell work (tests inject cheap
    ones); it must be a module-level function when ``jobs`` > 1.
    """
    spec, cells = plan(sweep, overrides)  # every cell validated, before anything is written
    out = make_folder(Path(out))
    _check_numerics(out, jobs)
    write_text(out / "sweep.yaml", yaml.safe_dump(spec.model_dump(), sort_keys=False))
    keys = grid_keys(spec.grid)
    results_path = out / "results.csv"
    rows = {r["cell_id"]: r for r in read_results(results_path)}
    adopt_saved_cells(out, cells, rows, keys, log)
    todo = [(p, r, i) for p, r, i in cells if rows.get(i, {}).get("status") != "ok"]
    log(f"sweep {spec.name}: {len(cells)} cells, {len(cells) - len(todo)} already done, "
        f"{len(todo)} to run → {results_path}")

    def record(row: dict) -> None:
        rows[row["cell_id"]] = row
        write_results(results_path, list(rows.values()), keys)
        what = "ok" if row["status"] == "ok" else f"FAILED ({row['error']})"
        log(f"  cell {row['cell_id']} {json.dumps({k: row.get(k) for k in keys})}: {what} "
            f"in {row['seconds']:.1f}s")

    if jobs <= 1 or len(todo) <= 1:
        for params, recipe, ident in todo:
            record(execute_cell(cell_fn, recipe, params, out / "cells" / ident))
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        context = get_context("spawn")
        gpu_ids = None
        if (gpus := visible_gpus()) > 1:  # one GPU per worker, round robin
            gpu_ids = context.Queue()
            for worker in range(jobs):
                gpu_ids.put(worker % gpus)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context,
                                 initializer=_worker_init, initargs=(threads, gpu_ids)) as pool:
            futures = [pool.submit(execute_cell, cell_fn, recipe, params, out / "cells" / ident)
                       for params, recipe, ident in todo]
            try:
                for future in as_completed(futures):
                    record(future.result())
            except BrokenProcessPool:
                raise DensesslError("a sweep worker process died (out of memory or killed); "
                                    "rerun the same command to resume") from None
            except OutputError:  # a full disk: start no further cell
                for future in futures:
                    future.cancel()
                raise
    ordered = [rows[i] for _, _, i in cells if i in rows]
    current = {i for _, _, i in cells}
    # Rows of cells no longer in the grid (an edited sweep) stay in the table, after the others.
    write_results(results_path, ordered + [r for k, r in rows.items() if k not in current], keys)
    paths = write_summary(out, ordered, keys, spec.report.model_dump())
    failed = sum(r["status"] != "ok" for r in ordered)
    log(f"sweep {spec.name}: {len(ordered) - failed} ok, {failed} failed; summary "
        f"{', '.join(str(p) for p in paths)}")
    return ordered
