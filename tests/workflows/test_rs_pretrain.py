"""End to end: both remote-sensing recipes pretrain for 2 steps on CPU through the CLI, on their
synthetic sets (generated into a temporary cache), and carry the dataset cards."""

import json
from pathlib import Path

import pytest

from densessl.cli import main

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.mark.parametrize("recipe, channels", [("xbd_temporal.yaml", 3),
                                              ("geotiff_temporal.yaml", 4)])
def test_recipe_pretrains_two_steps(recipe, channels, tmp_path):
    out = tmp_path / "run"
    code = main(["pretrain", str(RECIPES / recipe), "--out", str(out),
                 "--set", "train.max_steps=2", "--set", "train.batch_size=4",
                 "--set", "model.split_bn_groups=2",
                 "--set", "train.num_workers=0", "--set", "augment.view_size=32",
                 "--set", f"data.options.cache_dir={tmp_path / 'cache'}"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["skipped_samples"] == 0
    assert metrics["final"]["valid_fraction"] > 0.2
    assert metrics["datasets"] and metrics["datasets"][0]["licence"]
    encoder = json.loads((out / "encoder.json").read_text())
    assert encoder["in_channels"] == channels and encoder["pair_builder"] == "temporal"
    assert (tmp_path / "cache" / "synthetic").is_dir()
