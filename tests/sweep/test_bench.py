"""`densessl bench` runs end to end on a tiny setting (its figures are for notes, not asserted);
its FLOP counter and timer are checked against hand-written counts and a step of known length."""

import json
import time
from types import SimpleNamespace

import pytest
import torch

from densessl.bench.training import count_flops, time_interleaved
from densessl.cli import main


def test_bench_reports_every_configuration(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--steps", "1", "--batch-size", "4", "--image-size", "32",
                 "--skip-builders", "--skip-data-wait", "--json", str(out),
                 "--peak-tflops", "1.5", "--profile", str(tmp_path / "profile")]) == 0
    results = json.loads(out.read_text())
    steps = results["steps"]
    assert {"moco_v2_lightly", "dense", "dense_detcon"} <= steps.keys()
    for entry in steps.values():
        assert entry["pairs_per_s"] > 0 and "ratio_to_moco" in entry
        assert entry["peak_memory_mb"] >= 0
        assert entry["gflop_per_step"] > 0
        assert entry["mfu"] == pytest.approx(entry["achieved_tflops"] / 1.5, abs=1e-3)
    assert steps["moco_v2_lightly"]["ratio_to_moco"] == 1.0
    assert results["augmentation"]["pairs_per_s"] > 0
    assert results["per_class_queue"]["per_class_queue"]["full_ms"] > 0
    # the instance objective and the dense one cost more model FLOPs than MoCo-v2
    assert steps["dense"]["gflop_per_step"] > steps["moco_v2_lightly"]["gflop_per_step"]
    # an objective added through the registry (DetCon) runs in the bench's step
    assert steps["dense_detcon"]["final_loss"] > 0
    for name in steps:
        assert (tmp_path / "profile" / f"{name}.trace.json").stat().st_size > 0
        assert "Name" in (tmp_path / "profile" / f"{name}.top_ops.txt").read_text()


def test_flop_count_matches_the_analytic_count():
    """count_flops against FLOPs written out by hand for a step of known shape: a 3×3
    convolution and a linear layer, forward and the weights' gradients (the input needs
    none)."""
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    linear = torch.nn.Linear(8 * 16 * 16, 32, bias=False)
    images = torch.randn(2, 3, 16, 16)

    def step(batch):
        loss = linear(conv(batch).flatten(1)).sum()
        loss.backward()
        return loss

    conv_fwd = 2 * (3 * 3 * 3) * 8 * (16 * 16) * 2  # MACs per output × outputs × batch
    linear_fwd = 2 * 2 * (8 * 16 * 16) * 32
    # backward: each weight gradient costs its forward, and the linear layer also passes a
    # gradient back to the convolution's output (its input), another forward's worth
    expected = 2 * conv_fwd + 3 * linear_fwd
    assert count_flops(step, images, torch.device("cpu"), "32") == expected


def test_timer_measures_the_step():
    """time_interleaved against a step whose duration is known (a sleep): the reported step
    time is at least the sleep, and pairs/s is the batch over it."""
    def step(batch):
        time.sleep(0.03)
        return torch.zeros(())

    timed = time_interleaved({"sleep": step}, SimpleNamespace(batch_size=6), steps=2, rounds=3,
                             device=torch.device("cpu"), precision="32")["sleep"]
    assert 30.0 <= timed["step_ms"] < 1000.0
    assert len(timed["step_ms_rounds"]) == 3 and min(timed["step_ms_rounds"]) >= 30.0
    assert timed["pairs_per_s"] == pytest.approx(6000.0 / timed["step_ms"], rel=1e-3)
