"""Shared pieces of the fault-injection suite: tiny recipes, a killable CLI run, comparisons."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SAME_IMAGE = str(ROOT / "recipes" / "same_image.yaml")
XRAY = str(ROOT / "recipes" / "xray_segloc.yaml")

TINY = ["train.batch_size=4", "data.options.num_images=8", "data.image_size=48",
        "augment.view_size=32", "loss.dense.queue_size=1000", "loss.global.queue_size=16",
        "model.split_bn_groups=2"]
# the per-class queue X-ray recipe (SegLoc: dense + instance contrast, 14 rings each)
TINY_XRAY = ["train.batch_size=4", "model.split_bn_groups=2", "data.image_size=64",
             "augment.view_size=48", "loss.instance.roi_head_fc_dim=32", "loss.dense.queue_size=64",
             "loss.instance.queue_size=16", "loss.dense.samples_per_image=8"]


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "densessl", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def kill_when(args: list[str], ready, timeout: float = 300) -> subprocess.Popen:
    """Start ``densessl ARGS`` and SIGKILL it as soon as ``ready()`` is true; the run must not
    have ended by itself (else the test proves nothing)."""
    proc = subprocess.Popen([sys.executable, "-m", "densessl", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"run ended (rc {proc.returncode}) before the kill: "
                                     f"{proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("kill condition never became true")
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return proc


def saved_step(out: Path) -> int:
    metrics = _json(out / "metrics.json") or {}
    return int(metrics.get("steps", -1))


def max_abs_diff(out_a: Path, out_b: Path) -> dict[str, float]:
    """Largest |a - b| over the checkpoint's weights, queue buffers, encoder.pt and the final
    metrics of two run folders."""
    a = torch.load(out_a / "checkpoints/last.ckpt", weights_only=False, map_location="cpu")
    b = torch.load(out_b / "checkpoints/last.ckpt", weights_only=False, map_location="cpu")
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    diff = {"weights": 0.0, "queues": 0.0, "optimizer": 0.0, "encoder": 0.0, "metrics": 0.0}
    for key, va in a["state_dict"].items():
        kind = "queues" if "queue" in key else "weights"
        vb = b["state_dict"][key]
        if va.numel():
            diff[kind] = max(diff[kind], (va.double() - vb.double()).abs().max().item())
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(),
                      b["optimizer_states"][0]["state"].values()):
        for name, va in sa.items():
            if torch.is_tensor(va):
                d = (va.double() - sb[name].double()).abs().max().item()
                diff["optimizer"] = max(diff["optimizer"], d)
    ea, eb = torch.load(out_a / "encoder.pt"), torch.load(out_b / "encoder.pt")
    diff["encoder"] = max((ea[k].double() - eb[k].double()).abs().max().item() for k in ea)
    ma, mb = _json(out_a / "metrics.json")["final"], _json(out_b / "metrics.json")["final"]
    assert ma.keys() == mb.keys()
    diff["metrics"] = max(abs(ma[k] - mb[k]) for k in ma if k != "momentum")
    return diff
