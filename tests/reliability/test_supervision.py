"""Time-based checkpoints fire on the clock (a stubbed one, so the test never waits), and a
killed sweep's worker processes die with it (real processes, SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from densessl.workflows import pretraining
from densessl.workflows.pretraining import PeriodicCheckpoint


class _Trainer:
    def __init__(self, max_steps):
        self.global_step, self.max_steps, self.world_size = 0, max_steps, 1


class _Guard:
    def check(self, trainer):
        pass


def test_checkpoint_minutes_saves_on_the_clock(monkeypatch):
    clock = {"now": 1000.0}
    monkeypatch.setattr(pretraining.time, "monotonic", lambda: clock["now"])
    saved = []
    saver = PeriodicCheckpoint(lambda trainer, finished: saved.append(trainer.global_step),
                               every_steps=0, every_minutes=10, check_every=5, guard=_Guard())
    trainer = _Trainer(max_steps=40)
    saver.on_train_start(trainer, None)
    # (step, seconds since start): the clock is read every 5 steps only
    for step, seconds in [(5, 599), (10, 600), (12, 1300), (14, 1300), (15, 1300),
                          (20, 1899), (25, 1900), (40, 9999)]:
        clock["now"] = 1000.0 + seconds
        trainer.global_step = step
        saver.on_train_batch_end(trainer, None, None, None, step)
    # 10: 10 min since start; 15: 11.7 min since 10 (12 and 14 are not clock steps);
    # 25: 10 min since 15; 40: the last step, saved after fit, not here
    assert saved == [10, 15, 25]


WORKER_SCRIPT = """
import os, sys, time
from pathlib import Path
from densessl.sweep import run_sweep
spec = {{"name": "t", "base": "demo", "set": {{"train.max_steps": 1}},
        "grid": {{"seed": [0, 1, 2, 3]}}}}
folder = Path(sys.argv[2])
def cell(recipe, cell_dir):
    (folder / f"worker{{os.getpid()}}").write_text("")
    time.sleep(300)
    return {{}}
if __name__ == "__main__":
    run_sweep(spec, Path(sys.argv[1]), jobs=2, cell_fn=cell, log=lambda *_: None)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_sweep_workers_die_with_their_parent(tmp_path):
    script, pids = tmp_path / "sweep_parent.py", tmp_path / "pids"
    pids.mkdir()
    script.write_text(WORKER_SCRIPT.format())
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path / "out"), str(pids)])
    try:
        deadline = time.time() + 120
        while len(list(pids.iterdir())) < 2:
            assert parent.poll() is None and time.time() < deadline, "workers never started"
            time.sleep(0.2)
        workers = [int(p.name[len("worker"):]) for p in pids.iterdir()]
        assert all(_alive(w) for w in workers)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.time() + 20
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "sweep workers outlived their parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        for p in pids.iterdir():
            try:
                os.kill(int(p.name[len("worker"):]), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
