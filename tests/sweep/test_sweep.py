"""Sweep machinery: resume, crashes mid-cell (exception and SIGKILL), failures, summary, plots.

Cells here are cheap functions injected into :func:`run_sweep`; one slow-marked test runs a
real tiny pretrain → fine-tune cell.
"""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from densessl.errors import RecipeError
from densessl.sweep import cell_id, expand_grid, plan, run_sweep
from densessl.sweep.report import read_results, summarize, write_results

SPEC = {"name": "t", "base": "demo", "set": {"train.max_steps": 1},
        "grid": [{"noise.kind": ["none"], "seed": [0, 1]},
                 {"noise.kind": ["mismatch", "partial_change"], "noise.amount": [0.5, 1.0],
                  "seed": [0, 1]}],
        "report": {"x": "noise.amount"}}
N_CELLS = 2 + 2 * 2 * 2


def fake_cell(recipe: dict, cell_dir: Path) -> dict:
    """A metric that depends on the cell's recipe, like a real one would."""
    (cell_dir / "work.txt").write_text("done")
    amount, seed = recipe["noise"]["amount"], recipe["seed"]
    return {"pretrained/segmentation/fpn@100%/mIoU": 0.5 - 0.1 * amount + 0.01 * seed,
            "random/segmentation/fpn@100%/mIoU": 0.3}


def unique_rows(out):
    rows = read_results(out / "results.csv")
    ids = [r["cell_id"] for r in rows]
    assert len(ids) == len(set(ids)), "duplicated rows"
    return rows


def test_grid_expansion_and_ids():
    _, cells = plan(SPEC)
    assert len(cells) == N_CELLS and len({i for _, _, i in cells}) == N_CELLS
    params, recipe, ident = cells[3]
    assert recipe["noise"]["kind"] == params["noise.kind"] and recipe["train"]["max_steps"] == 1
    _, other = plan(SPEC, overrides=["train.max_steps=2"])  # other settings → other cells
    assert ident == cell_id(params, recipe) != other[3][2]
    assert expand_grid({"a": [1, 2], "b": ["x"]}) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]


def test_resume_skips_finished_cells(tmp_path):
    calls = []

    def counting(recipe, cell_dir):
        calls.append(recipe["seed"])
        return fake_cell(recipe, cell_dir)

    run_sweep(SPEC, tmp_path, cell_fn=counting, log=lambda *_: None)
    assert len(calls) == N_CELLS
    first = unique_rows(tmp_path)
    run_sweep(SPEC, tmp_path, cell_fn=counting, log=lambda *_: None)
    assert len(calls) == N_CELLS  # nothing rerun
    assert unique_rows(tmp_path) == first
    assert (tmp_path / "summary.md").is_file()
    assert (tmp_path / "plots" / "pretrained_segmentation_fpn_100pct_mIoU.png").is_file()


ROBUST_SPEC = {"name": "r", "base": "demo", "set": {"train.max_steps": 1},
               "grid": {"loss.robust.kind": ["none", "rank"], "seed": [0, 1]},
               "report": {"x": None}}


def as_flat_loss_cell(cell_dir: Path, new_dir: Path) -> None:
    """Rewrite a finished cell as a sweep from before the loss sections saved it: the
    ``loss.robust`` section as the former flat keys (written out by hand here), the grid key
    ``loss.robust`` and another folder name."""
    saved = json.loads((cell_dir / "cell.json").read_text())
    loss = saved["recipe"]["loss"]
    robust = loss.pop("robust")
    loss.update(robust=robust["kind"], rince_q=robust["rince_q"],
                rince_lambda=robust["rince_lambda"],
                truncate_fraction=robust["truncate_fraction"],
                truncate_warmup_steps=robust["truncate_warmup_steps"],
                rank_threshold=robust["rank_threshold"])
    params = saved["params"]
    params["loss.robust"] = params.pop("loss.robust.kind")
    cell_dir.rename(new_dir)
    (new_dir / "cell.json").write_text(json.dumps(saved))


def test_cells_saved_before_the_loss_sections_are_kept_not_rerun(tmp_path):
    run_sweep(ROBUST_SPEC, tmp_path, cell_fn=fake_cell, log=lambda *_: None)
    before = {(r["loss.robust.kind"], r["seed"]): r for r in unique_rows(tmp_path)}
    # the folder as an older densessl left it: old ids, old grid key, flat loss keys
    old_rows = []
    for n, row in enumerate(read_results(tmp_path / "results.csv")):
        old_id = f"old{n:09d}"
        as_flat_loss_cell(tmp_path / "cells" / row["cell_id"], tmp_path / "cells" / old_id)
        row["loss.robust"] = row.pop("loss.robust.kind")
        old_rows.append({**row, "cell_id": old_id})
    # one saved cell trained something else (another lr): it must be rerun, not adopted
    other = json.loads((tmp_path / "cells" / "old000000000" / "cell.json").read_text())
    other["recipe"]["train"]["lr"] *= 2
    (tmp_path / "cells" / "old000000000" / "cell.json").write_text(json.dumps(other))
    write_results(tmp_path / "results.csv", old_rows, ["loss.robust", "seed"])

    calls = []

    def counting(recipe, cell_dir):
        calls.append((recipe["loss"]["robust"]["kind"], recipe["seed"]))
        return fake_cell(recipe, cell_dir)

    run_sweep(ROBUST_SPEC, tmp_path, cell_fn=counting, log=lambda *_: None)
    assert calls == [(old_rows[0]["loss.robust"], int(old_rows[0]["seed"]))]
    rows = unique_rows(tmp_path)
    planned = {i for _, _, i in plan(ROBUST_SPEC)[1]}
    assert {r["cell_id"] for r in rows if r["cell_id"] in planned} == planned
    for row in rows:
        if row["cell_id"] not in planned:  # the unmatched old row stays, as for an edited grid
            assert row["cell_id"] == "old000000000"
            continue
        key = (row["loss.robust.kind"], row["seed"])
        metric = "pretrained/segmentation/fpn@100%/mIoU"
        assert row[metric] == before[key][metric] and row["status"] == "ok"
        saved = json.loads((tmp_path / "cells" / row["cell_id"] / "cell.json").read_text())
        assert saved["params"]["loss.robust.kind"] == key[0]
        assert "loss.robust" not in row or row["loss.robust"] == ""


class SimulatedCrash(BaseException):
    """Like a kill: not an Exception, so the sweep does not record it as a failed cell."""


def test_crash_mid_cell_then_resume_redoes_it_cleanly(tmp_path):
    def crashing(recipe, cell_dir):
        if recipe["noise"]["kind"] == "partial_change":
            (cell_dir / "half_written.txt").write_text("partial")
            raise SimulatedCrash
        return fake_cell(recipe, cell_dir)

    with pytest.raises(SimulatedCrash):
        run_sweep(SPEC, tmp_path, cell_fn=crashing, log=lambda *_: None)
    before = unique_rows(tmp_path)
    assert 0 < len(before) < N_CELLS and all(r["status"] == "ok" for r in before)
    run_sweep(SPEC, tmp_path, cell_fn=fake_cell, log=lambda *_: None)
    rows = unique_rows(tmp_path)
    assert len(rows) == N_CELLS and all(r["status"] == "ok" for r in rows)
    assert not list(tmp_path.glob("cells/*/half_written.txt"))  # the cell folder was wiped


KILL_SCRIPT = """
import sys, time
from pathlib import Path
from densessl.sweep import run_sweep
spec, out, marker = {spec!r}, Path(sys.argv[1]), Path(sys.argv[2])
def cell(recipe, cell_dir):
    if recipe["noise"]["kind"] == "mismatch" and recipe["seed"] == 1:
        (cell_dir / "half_written.txt").write_text("partial")
        marker.write_text(str(cell_dir))
        time.sleep(120)
    return {{"pretrained/segmentation/fpn@100%/mIoU": 0.4,
            "random/segmentation/fpn@100%/mIoU": 0.3}}
run_sweep(spec, out, cell_fn=cell, log=lambda *_: None)
"""


def test_sigkill_mid_cell_then_resume_has_no_duplicate_or_missing_rows(tmp_path):
    out, marker = tmp_path / "sweep", tmp_path / "started"
    script = tmp_path / "kill_me.py"
    script.write_text(KILL_SCRIPT.format(spec=SPEC))
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(marker)])
    try:
        deadline = time.time() + 90
        while not marker.exists():
            assert proc.poll() is None and time.time() < deadline, "sweep never reached the cell"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_dir = Path(marker.read_text())
    done = unique_rows(out)
    assert killed_dir.name not in {r["cell_id"] for r in done}
    run_sweep(SPEC, out, cell_fn=fake_cell, log=lambda *_: None)
    rows = unique_rows(out)
    assert {r["cell_id"] for r in rows} == {i for _, _, i in plan(SPEC)[1]}
    assert not (killed_dir / "half_written.txt").exists()
    assert (killed_dir / "work.txt").is_file()


def failing_on_mismatch(recipe, cell_dir):
    if recipe["noise"]["kind"] == "mismatch" and recipe["noise"]["amount"] == 1.0:
        raise ValueError("no GPU\nsecond line")
    return fake_cell(recipe, cell_dir)


def test_failed_cell_is_recorded_and_sweep_goes_on(tmp_path):
    rows = run_sweep(SPEC, tmp_path, cell_fn=failing_on_mismatch, log=lambda *_: None)
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 2 and len(rows) == N_CELLS
    assert failed[0]["error"] == "ValueError: no GPU second line"
    assert all(r["status"] == "ok" for r in rows if r not in failed)
    on_disk = {r["cell_id"]: r for r in unique_rows(tmp_path)}
    assert on_disk[failed[0]["cell_id"]]["error"] == "ValueError: no GPU second line"
    rows = run_sweep(SPEC, tmp_path, cell_fn=fake_cell, log=lambda *_: None)  # retried
    assert all(r["status"] == "ok" for r in rows) and len(unique_rows(tmp_path)) == N_CELLS


def test_parallel_jobs_give_the_same_rows(tmp_path):
    spec = {**SPEC, "grid": {"noise.kind": ["mismatch"], "noise.amount": [0.0, 0.5, 1.0]}}
    rows = run_sweep(spec, tmp_path, jobs=2, cell_fn=fake_cell, log=lambda *_: None)
    assert [float(r["pretrained/segmentation/fpn@100%/mIoU"]) for r in rows] == \
        pytest.approx([0.5, 0.45, 0.4])
    assert len(unique_rows(tmp_path)) == 3


def gpu_cell(recipe: dict, cell_dir: Path) -> dict:
    """Reports which GPU and process the worker was given. Each cell first waits (up to two
    minutes) until two worker processes have each taken a cell, so both workers surely run."""
    import os

    arrived = cell_dir.parents[1] / "arrived"
    arrived.mkdir(exist_ok=True)
    (arrived / str(os.getpid())).touch()
    deadline = time.monotonic() + 120
    while len(list(arrived.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"gpu": float(os.environ.get("CUDA_VISIBLE_DEVICES", "-1")), "pid": os.getpid()}


def test_parallel_workers_get_one_gpu_each(tmp_path, monkeypatch):
    # no GPU here: pretend there are two; the workers only read CUDA_VISIBLE_DEVICES
    monkeypatch.setattr("densessl.sweep.runner.visible_gpus", lambda: 2)
    spec = {**SPEC, "grid": {"noise.kind": ["mismatch"], "noise.amount": [0.0, 0.5, 1.0, 0.7]}}
    rows = run_sweep(spec, tmp_path, jobs=2, cell_fn=gpu_cell, log=lambda *_: None)
    assert all(r["status"] == "ok" for r in rows)
    gpu_of = {}  # worker process → the GPUs its cells saw
    for r in rows:
        gpu_of.setdefault(int(float(r["pid"])), set()).add(float(r["gpu"]))
    assert len(gpu_of) == 2, "both workers ran cells"
    assert all(len(g) == 1 for g in gpu_of.values()), "a worker keeps its GPU"
    assert sorted(g for (g,) in gpu_of.values()) == [0.0, 1.0], "one distinct GPU each"


def test_summary_mean_std_on_hand_made_csv(tmp_path):
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["cell_id", "status", "error", "seconds", "noise.kind", "seed", "m"])
        w.writerows([["a", "ok", "", 1, "mismatch", 0, 0.2], ["b", "ok", "", 1, "mismatch", 1, 0.4],
                     ["c", "ok", "", 1, "mismatch", 2, 0.9], ["d", "ok", "", 1, "none", 0, 0.5],
                     ["e", "failed", "boom", 1, "none", 1, ""]])
    summary = {e["noise.kind"]: e for e in summarize(read_results(path), ["noise.kind", "seed"])}
    assert summary["mismatch"]["n"] == 3 and summary["mismatch"]["m"] == pytest.approx(0.5)
    assert summary["mismatch"]["m:std"] == pytest.approx(math.sqrt(0.13))  # sample std
    assert summary["none"]["n"] == 1 and summary["none"]["m:std"] == 0.0


def test_sweep_yaml_is_validated(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: demo\ngrid: {seed: [0]}\nrepot: {}\n")
    with pytest.raises(RecipeError, match="repot: unknown key"):
        run_sweep(bad, tmp_path / "o", cell_fn=fake_cell)
    bad.write_text("base: demo\ngrid: {noise.amout: [0.5]}\n")
    with pytest.raises(RecipeError, match="noise.amout: unknown key"):
        run_sweep(bad, tmp_path / "o", cell_fn=fake_cell)
    assert not (tmp_path / "o" / "results.csv").exists()  # nothing ran


def test_python_api_sweep_checks_every_cell_before_writing(tmp_path):
    """run_sweep itself (not only the CLI) refuses a cell no registry can build, before the
    output folder exists or any cell runs."""
    spec = {**SPEC, "grid": {"pairs.builder": ["cut_paste", "bogus"]}}
    ran = []
    with pytest.raises(RecipeError, match="pairs.builder: unknown builder 'bogus'"):
        run_sweep(spec, tmp_path / "out", cell_fn=lambda r, d: ran.append(d) or {},
                  log=lambda *_: None)
    assert not (tmp_path / "out").exists() and not ran


def test_shipped_sweeps_are_valid():
    from densessl.sweep import cell_recipe, load_sweep

    for path in Path(__file__).parents[2].glob("recipes/sweeps/*.yaml"):
        spec, base, _ = load_sweep(path)
        for params in expand_grid(spec.grid):
            cell_recipe(base, params, str(path))


@pytest.mark.slow
def test_real_tiny_cell_end_to_end(tmp_path):
    spec = {"name": "tiny", "base": str(Path(__file__).parents[2] / "recipes/same_image.yaml"),
            "set": {"train.max_steps": 2, "train.batch_size": 4, "train.num_workers": 0,
                    "data.image_size": 32, "augment.view_size": 32,
                    "data.options": {"num_images": 8}, "loss.dense.queue_size": 64,
                    "loss.global.queue_size": 16, "model.neck_dim": 16, "model.dense_dim": 16,
                    "model.global_dim": 16, "finetune.steps": 2, "finetune.image_size": 32,
                    "finetune.batch_size": 4, "finetune.label_fractions": [1.0],
                    "finetune.tasks": ["segmentation", "linear_probe"],
                    "finetune.inits": ["pretrained", "random"], "finetune.seeds": [0],
                    "finetune.probe_steps": 3, "model.split_bn_groups": 2,
                    "finetune.options": {"num_train": 4, "num_val": 4, "num_source": 0}},
            "grid": {"noise.kind": ["mismatch"], "noise.amount": [0.5]}}
    rows = run_sweep(spec, tmp_path, log=lambda *_: None)
    assert rows[0]["status"] == "ok", rows[0]["error"]
    row = unique_rows(tmp_path)[0]
    for key in ("pretrained/segmentation/fpn@100%/mIoU", "random/segmentation/fpn@100%/mIoU",
                "gap/segmentation/fpn@100%/mIoU", "pretrain/loss",
                "pretrained/linear_probe@100%/fg_mIoU", "floor/linear_probe@100%/mIoU",
                "differences/pretrained - random/linear_probe@100%/mIoU/mean"):
        assert math.isfinite(float(row[key])), key
    assert (tmp_path / "cells" / row["cell_id"] / "pretrain" / "encoder.pt").is_file()
