"""kill -9 a real pretraining process, resume it, and get the uninterrupted run bit for bit
(encoder, every queue ring and pointer, optimiser state, final metrics) on the CPU."""

from __future__ import annotations

import json

import pytest

from tests.reliability.helpers import (
    SAME_IMAGE,
    TINY,
    TINY_XRAY,
    XRAY,
    cli,
    kill_when,
    max_abs_diff,
    saved_step,
    sets,
)

STEPS = 8


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs (no DataLoader workers; the killed runs use one: the stream of
    samples must not depend on it)."""
    out = tmp_path_factory.mktemp("reference")
    done = {}
    for name, recipe, tiny in (("same_image", SAME_IMAGE, TINY), ("xray", XRAY, TINY_XRAY)):
        run = cli("pretrain", recipe, "--out", str(out / name),
                  *sets(tiny + [f"train.max_steps={STEPS}", "train.num_workers=0"]))
        assert run.returncode == 0, run.stderr[-3000:]
        done[name] = out / name
    return done


def test_killed_after_a_checkpoint_resumes_exactly(reference, tmp_path):
    out = tmp_path / "killed"
    args = ["pretrain", SAME_IMAGE, "--out", str(out),
            *sets(TINY + [f"train.max_steps={STEPS}", "train.num_workers=1",
                          "train.checkpoint_every=2"])]
    kill_when(args, lambda: saved_step(out) >= 2)
    # the step's checkpoint, encoder and metrics agree
    step = saved_step(out)
    assert 2 <= step < STEPS
    assert json.loads((out / "encoder.json").read_text())["steps"] == step
    assert json.loads((out / "metrics.json").read_text())["status"] == "running"
    resumed = cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == STEPS and metrics["status"] == "finished"
    assert metrics["resumed_from_step"] >= step
    diff = max_abs_diff(reference["same_image"], out)
    assert diff == {k: 0.0 for k in diff}, diff


def test_xray_per_class_queues_killed_during_a_save_resume_exactly(reference, tmp_path):
    out = tmp_path / "killed_xray"
    ckpt_dir = out / "checkpoints"
    args = ["pretrain", XRAY, "--out", str(out),
            *sets(TINY_XRAY + [f"train.max_steps={STEPS}", "train.num_workers=1",
                               "train.checkpoint_every=2"])]
    # in the middle of the second save: a temporary exists next to a complete checkpoint
    kill_when(args, lambda: (ckpt_dir / "last.ckpt").is_file()
              and (ckpt_dir / ".last.ckpt.tmp").exists())
    resumed = cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not list(out.rglob("*.tmp")), "a temporary of the killed save was left behind"
    diff = max_abs_diff(reference["xray"], out)
    assert diff == {k: 0.0 for k in diff}, diff


def test_resume_at_max_steps_changes_nothing(reference, tmp_path):
    out = reference["same_image"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    run = cli("pretrain", SAME_IMAGE, "--out", str(out), "--resume",
              *sets(TINY + [f"train.max_steps={STEPS}"]))
    assert run.returncode == 0 and "nothing to do" in run.stdout
    past = cli("pretrain", SAME_IMAGE, "--out", str(out), "--resume",
               *sets(TINY + [f"train.max_steps={STEPS - 2}"]))
    assert past.returncode == 2 and f"at step {STEPS}" in past.stderr
    assert "Traceback" not in past.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
