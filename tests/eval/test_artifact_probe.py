"""Spurious-artifact probe (issue 17, part B): a planted artifact channel ranks first, an
artifact-free control marks nothing, drop_channels zeroes exactly the listed channels."""

import json

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn as nn
import torch.nn.functional as F

from densessl.errors import DensesslError
from densessl.eval.artifact_probe import (
    attach_channel_drop,
    binomial_sf,
    probe_artifacts,
    read_drop_channels,
    stamp,
    write_report,
)
from densessl.models.backbone import ResNetBackbone

MEAN, STD = 0.5, 0.25
PLANTED = ("c3", 17)


def dark_images(n=64, size=32, seed=0):
    """Smooth random images in [0, 0.4]: never as bright as a stamp."""
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.rand(n, 3, size, size, generator=g), 3, 1, 1)
    return 0.4 * (x - x.amin()) / (x.amax() - x.amin())


class PlantedEncoder(nn.Module):
    """A random ResNet-18 whose c3 channel 17 is replaced by a bright-pixel detector (the
    stamps are light, the images dark): built to fire on the artifact."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = ResNetBackbone("resnet18")

    def forward(self, x):
        out = self.backbone(x)
        raw = (x * STD + MEAN).mean(1, keepdim=True)
        fire = F.avg_pool2d(F.relu(raw - 0.45), 8)
        c3 = out["c3"].clone()
        c3[:, PLANTED[1]] = fire[:, 0]
        return {**out, "c3": c3}


def test_stamp_places_the_artifact_and_control_changes_nothing():
    g = torch.Generator().manual_seed(1)
    image = dark_images(1, 48)[0]
    for kind in ("text", "logo", "border"):
        stamped, alpha = stamp(image, kind, g)
        assert 0 < (alpha > 0).float().mean() < 0.8, kind
        changed = (stamped - image).abs().amax(0) > 1e-6
        assert torch.equal(changed, alpha > 0), kind
    stamped, alpha = stamp(image, "border", g)
    rows, cols = (alpha > 0).any(1), (alpha > 0).any(0)
    # a band touches an edge over its whole length
    assert bool((alpha > 0).all(1)[[0, -1]].any() or (alpha > 0).all(0)[[0, -1]].any())
    assert rows.any() and cols.any()
    same, alpha = stamp(image, "none", g)
    assert torch.equal(same, image) and alpha.sum() == 0


def test_binomial_tail_matches_direct_sum():
    # P(X >= 9) for Binomial(10, 1/2) = 11/1024
    assert binomial_sf(9, 10) == pytest.approx(11 / 1024)
    assert binomial_sf(0, 7) == 1.0


def test_planted_channel_ranks_first(tmp_path):
    result = probe_artifacts(PlantedEncoder(), dark_images(), "text", mean=[MEAN], std=[STD],
                             seed=0)
    top = result["channels"][0]
    assert (top["stage"], top["channel"]) == PLANTED
    assert top["probe_accuracy"] >= 0.9 and top["carries"] and top["shift"] > 0
    assert result["stage_channels"] == {"c2": 64, "c3": 128, "c4": 256, "c5": 512}
    carrying = sum(r["carries"] for r in result["channels"])
    assert result["share"]["all"] == pytest.approx(carrying / 960)
    paths = write_report(result, tmp_path)
    table = json.loads(paths["json"].read_text())
    assert table["channels"][0]["rank"] == 1 and (table["channels"][0]["stage"],
                                                 table["channels"][0]["channel"]) == PLANTED
    assert "| 1 | c3 | 17 |" in paths["md"].read_text()
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_artifact_free_control_marks_nothing():
    result = probe_artifacts(PlantedEncoder(), dark_images(), "none", mean=[MEAN], std=[STD],
                             seed=0)
    assert result["share"]["all"] == 0
    assert not any(r["carries"] for r in result["channels"])
    assert result["channels"][0]["probe_accuracy"] < result["min_significant_accuracy"]


class ConstantEncoder(nn.Module):
    """Channels that say nothing: constant, whatever the image."""

    def forward(self, x):
        return {"c2": torch.ones(x.shape[0], 3, 2, 2)}


@pytest.mark.parametrize("n", [40, 41, 64])
def test_a_channel_that_says_nothing_scores_exactly_chance(n):
    # the accuracy of a constant predictor is the test's majority rate; the binomial test is
    # against 1/2, so the test half must hold as many stamped as clean images (an unbalanced
    # split once marked channels of the artifact-free control on the demo encoder)
    for seed in range(6):
        result = probe_artifacts(ConstantEncoder(), dark_images(n=n), "none", levels=["c2"],
                                 mean=[MEAN], std=[STD], seed=seed)
        assert {r["probe_accuracy"] for r in result["channels"]} == {0.5}, seed
        assert result["n_test"] % 2 == 0


class BrightnessEncoder(nn.Module):
    """One channel: the image's mean brightness."""

    def forward(self, x):
        return {"c2": x.mean((1, 2, 3))[:, None, None, None].expand(-1, 1, 2, 2)}


def test_control_marks_nothing_when_images_differ_by_their_place_in_the_folder(tmp_path):
    # the first 20 files are dark, the last 20 bright: if the stamped / clean labels repeated
    # the permutation that chose the images, "stamped" would be "dark" and the brightness
    # channel would look like it carries an artifact the control never drew
    from PIL import Image

    from densessl.eval.artifact_probe import load_images

    for i in range(40):
        Image.new("RGB", (16, 16), (20, 20, 20) if i < 20 else (230, 230, 230)).save(
            tmp_path / f"{i:02d}.png")
    for seed in range(3):
        images = load_images(str(tmp_path), 40, 16, 3, seed)
        result = probe_artifacts(BrightnessEncoder(), images, "none", levels=["c2"],
                                 mean=[MEAN], std=[STD], seed=seed)
        assert not result["channels"][0]["carries"], (seed, result["channels"][0])


def test_drop_channels_removes_exactly_the_listed(tmp_path):
    table = {"channels": [{"rank": 1, "stage": "c3", "channel": 5},
                          {"rank": 2, "stage": "c5", "channel": 7},
                          {"rank": 3, "stage": "c3", "channel": 1},
                          {"rank": 4, "stage": "c2", "channel": 0}],
             "stage_channels": {"c2": 64, "c3": 128, "c4": 256, "c5": 512}}
    (tmp_path / "artifacts.json").write_text(json.dumps(table))
    drops = read_drop_channels(tmp_path / "artifacts.json", top_k=3)
    assert {k: v for k, v in drops.items() if k != "_sizes"} == {"c3": [1, 5], "c5": [7]}
    x = torch.rand(2, 3, 64, 64)
    torch.manual_seed(0)
    backbone = ResNetBackbone("resnet18").eval()
    model = smp.FPN("resnet18", encoder_weights=None, classes=3).eval()
    with torch.no_grad():
        ref_b, ref_s = backbone(x), model.encoder(x)
        handles = [attach_channel_drop(backbone, drops), attach_channel_drop(model.encoder,
                                                                                drops)]
        got_b, got_s = backbone(x), model.encoder(x)
        model(x)  # the whole model runs with the hook
    for level, i in (("c2", 2), ("c3", 3), ("c4", 4), ("c5", 5)):
        for ref, got in ((ref_b[level], got_b[level]), (ref_s[i], got_s[i])):
            dropped = drops.get(level, [])
            kept = [c for c in range(ref.shape[1]) if c not in dropped]
            assert torch.equal(got[:, kept], ref[:, kept])
            assert (got[:, dropped] == 0).all()
            assert ref[:, dropped].abs().sum() > 0 or not dropped  # they were not zero before
    for h in handles:
        h.remove()
    with pytest.raises(DensesslError, match="top_k: expected 1..4"):
        read_drop_channels(tmp_path / "artifacts.json", top_k=9)
    wrong = ResNetBackbone("resnet50").eval()
    attach_channel_drop(wrong, {"_sizes": {"c3": 128}, "c3": [5]})
    with pytest.raises(DensesslError, match="stage c3 has 512 channels"):
        wrong(torch.rand(1, 3, 64, 64))


def test_finetune_drop_channels_zero_the_probe_features_and_nothing_else(tmp_path):
    from densessl.data.labeled.build import build_eval_dataset
    from densessl.eval.finetune import ProbeCache
    from densessl.models.weights import EncoderInit
    from densessl.recipe import load_recipe

    table = {"channels": [{"rank": 1, "stage": "c3", "channel": 9},
                          {"rank": 2, "stage": "c2", "channel": 3},
                          {"rank": 3, "stage": "c3", "channel": 0},
                          {"rank": 4, "stage": "c2", "channel": 60}],
             "stage_channels": {"c2": 64, "c3": 128, "c4": 256, "c5": 512}}
    (tmp_path / "artifacts.json").write_text(json.dumps(table))
    data = build_eval_dataset("synthetic", {"num_train": 4, "num_val": 2, "num_source": 0},
                              image_size=32)
    base = {"finetune": {"probe_levels": ["c2", "c3"], "probe_pixels_per_image": 16,
                         "tasks": ["linear_probe"]}}
    plain = load_recipe(base)
    dropped = load_recipe(base, [f"finetune.drop_channels={{from: {tmp_path}/artifacts.json, "
                                 "top_k: 3}"])
    ref, ref_splits = ProbeCache().get(plain, data, EncoderInit("random"), 0)
    got, got_splits = ProbeCache().get(dropped, data, EncoderInit("random"), 0)
    gone = [3, 64 + 0, 64 + 9]  # hypercolumn columns: c2 (64 channels), then c3
    kept = [c for c in range(ref.x.shape[1]) if c not in gone]
    assert torch.equal(got.x[:, kept], ref.x[:, kept]) and (got.x[:, gone] == 0).all()
    assert ref.x[:, gone].abs().sum() > 0
    for name in ref_splits:
        assert torch.equal(got_splits[name].feats[0][:, 60], ref_splits[name].feats[0][:, 60])
        assert (got_splits[name].feats[1][:, [0, 9]] == 0).all()
    with pytest.raises(Exception, match="drop_channels applies to segmentation and linear_probe"):
        load_recipe(base, ["finetune.tasks=[detection]", "finetune.drop_channels={from: x, "
                           "top_k: 1}"])
