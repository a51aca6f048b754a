"""`densessl bench` runs end to end on a tiny setting (figures are for notes, not asserted)."""

import json

import pytest

from densessl.cli import main


def test_bench_reports_every_configuration(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--steps", "1", "--batch-size", "4", "--image-size", "32",
                 "--skip-builders", "--skip-data-wait", "--json", str(out),
                 "--peak-tflops", "1.5", "--profile", str(tmp_path / "profile")]) == 0
    results = json.loads(out.read_text())
    steps = results["steps"]
    assert {"moco_v2_lightly", "dense"} <= steps.keys()
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
    for name in steps:
        assert (tmp_path / "profile" / f"{name}.trace.json").stat().st_size > 0
        assert "Name" in (tmp_path / "profile" / f"{name}.top_ops.txt").read_text()
