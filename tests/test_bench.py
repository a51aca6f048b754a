"""`densessl bench` runs end to end on a tiny setting (figures are for notes, not asserted)."""

import json

from densessl.cli import main


def test_bench_reports_every_configuration(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--steps", "1", "--batch-size", "4", "--image-size", "32",
                 "--skip-builders", "--skip-data-wait", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    steps = results["steps"]
    assert {"moco_v2_lightly", "dense"} <= steps.keys()
    for entry in steps.values():
        assert entry["pairs_per_s"] > 0 and "ratio_to_moco" in entry
        assert entry["peak_memory_mb"] >= 0
    assert steps["moco_v2_lightly"]["ratio_to_moco"] == 1.0
    assert results["augmentation"]["pairs_per_s"] > 0
    assert results["per_class_queue"]["per_class_queue"]["full_ms"] > 0
