"""The real-size data benchmark runs and reports every figure (tiny sizes; speed not asserted)."""

import torch

from densessl.bench.data_pipeline import bench_real_sizes


def test_real_size_bench_reports_every_part():
    results = bench_real_sizes(torch.device("cpu"), batch_size=2, xray_px=64, xbd_px=128,
                               geotiff_px=256, window_px=64, samples=1, log=lambda _: None)
    for name in ("xray", "xbd", "geotiff"):
        assert "error" not in results[name], results[name]
    xray = results["xray"]
    for part in (xray["host_composite"], xray["device_composite"], results["xbd"],
                 results["geotiff"]):
        assert part["decode_ms_per_pair"] > 0 and part["builder_ms_per_pair"] > 0
        assert part["builder_over_decode"] > 0 and part["pairs_per_s_per_worker"] > 0
    assert xray["device_stage"]["pairs_per_s"] > 0 and xray["source_px"] == 64
    assert results["geotiff"]["bands"] == 13 and results["geotiff"]["warped"]
    assert results["load_1min_before"] >= 0
