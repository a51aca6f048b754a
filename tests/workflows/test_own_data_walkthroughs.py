"""The README's "Your own data" walkthroughs, end to end through the CLI, on data in the real
formats written here: a folder of 12-bit X-ray PNGs with COCO boxes and polygons; 4-band
uint16 GeoTIFF scenes with mask rasters in another CRS; PIDray / SIXray roots. Each runs the
command the README gives, at a budget a test can afford (the --set lines below only shrink
it), and checks what a user would look at: the exit code, results.json's splits and scores,
and the bit depth and normalisation recorded in recipe.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from geo_fixtures import write_scenes
from helpers import WALKTHROUGH_TINY as TINY
from helpers import set_args as sets
from PIL import Image

from densessl.cli import main

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
# ---------------------------------------------------------------- 12-bit X-ray PNGs + COCO
def xray_image(rng, size: int, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """A 12-bit X-ray in a uint16 PNG: bright air (~3900 of 4095) with darker items."""
    img = rng.normal(3900, 60, size=(size, size)).clip(0, 4095)
    for x0, y0, x1, y1 in boxes:
        img[y0:y1, x0:x1] = rng.normal(1200, 80, size=(y1 - y0, x1 - x0))
    return img.clip(0, 4095).astype(np.uint16)


def write_xray_coco(root: Path, seed: int = 0) -> dict[str, Path]:
    """``bags/`` (unlabeled), ``labeled/images/`` and COCO ``train.json`` / ``test.json`` with
    categories 3 (knife, polygons) and 17 (gun, one polygon plus one box-only entry)."""
    rng = np.random.default_rng(seed)
    (root / "bags").mkdir(parents=True)
    (root / "labeled" / "images").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(xray_image(rng, 96, [(10 + 5 * i, 20, 40 + 5 * i, 50)])).save(
            root / "bags" / f"bag{i}.png")
    cats = [{"id": 17, "name": "gun"}, {"id": 3, "name": "knife"}]
    splits = {"train": range(0, 8), "test": range(8, 11)}
    for split, ids in splits.items():
        images, anns = [], []
        for i in ids:
            x0, y0 = int(rng.integers(4, 30)), int(rng.integers(4, 30))
            boxes = [(x0, y0, x0 + 24, y0 + 12), (x0 + 4, y0 + 30, x0 + 20, y0 + 50)]
            Image.fromarray(xray_image(rng, 80, boxes)).save(
                root / "labeled" / "images" / f"img{i}.png")
            images.append({"id": i, "file_name": f"img{i}.png", "height": 80, "width": 80})
            for k, (bx0, by0, bx1, by1) in enumerate(boxes):
                poly = [bx0, by0, bx1, by0, bx1, by1, bx0, by1]
                ann = {"id": 100 * i + k, "image_id": i, "category_id": 3 if k == 0 else 17,
                       "bbox": [bx0, by0, bx1 - bx0, by1 - by0], "area": (bx1 - bx0) * (by1 - by0),
                       "iscrowd": 0, "segmentation": [poly]}
                anns.append(ann)
        (root / "labeled" / f"{split}.json").write_text(json.dumps(
            {"images": images, "annotations": anns, "categories": cats}))
    return {"bags": root / "bags", "images": root / "labeled" / "images",
            "train": root / "labeled" / "train.json", "test": root / "labeled" / "test.json"}


@pytest.mark.slow
def test_xray_pngs_with_coco_labels(tmp_path):
    paths = write_xray_coco(tmp_path / "data")
    out = tmp_path / "run"
    rc = main(["run", str(RECIPES / "own_xray_coco.yaml"), "--out", str(out),
               *sets(f"data.path={paths['bags']}", f"finetune.path={paths['images']}",
                     f"finetune.options.annotations={{train: {paths['train']}, "
                     f"test: {paths['test']}}}",
                     *TINY, "finetune.inits=[pretrained, random]")])
    assert rc == 0
    saved = yaml.safe_load((out / "pretrain" / "recipe.yaml").read_text())
    # 12-bit data in 16-bit files: scaled by 4095, so the bright air is near 1, not 0.06
    assert saved["data"]["bit_depth"] == 12
    mean, std = saved["augment"]["mean"], saved["augment"]["std"]
    assert isinstance(mean, list) and len(mean) == 1 and 0.6 < mean[0] < 1.0
    assert 0.05 < std[0] < 0.5
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["dataset"] == "coco"
    assert results["data"]["eval_splits"] == {"test": 3}
    assert results["data"]["bit_depth"] == 12
    assert results["data"]["normalisation"]["mean"] == mean  # fine-tuning saw what pretraining saw
    for init in ("pretrained", "random"):
        tasks = results[init]
        assert any(k.startswith("linear_probe") for k in tasks), tasks.keys()
        detection = next(v for k, v in tasks.items() if k.startswith("detection"))
        assert "box_mAP" in detection and 0.0 <= detection["box_mAP"] <= 1.0


def test_data_stats_prints_the_mean_of_the_scaled_pixels(tmp_path, capsys):
    """``densessl data stats`` over a folder of 12-bit PNGs read whole (no tiles, native
    size): its mean / std equal numpy's over every pixel divided by 4095."""
    root = tmp_path / "bags"
    root.mkdir()
    rng = np.random.default_rng(3)
    arrays = [xray_image(rng, 64, [(8, 8, 30, 40)]) for _ in range(5)]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(root / f"{i}.png")
    rc = main(["data", "stats", str(RECIPES / "own_xray_coco.yaml"),
               *sets(f"data.path={root}", "data.image_size=64", "augment.view_size=48",
                     "data.options={}")])
    assert rc == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    pixels = np.stack(arrays).astype(np.float64) / 4095.0
    assert printed["data"]["bit_depth"] == 12
    assert printed["augment"]["mean"][0] == pytest.approx(pixels.mean(), abs=1e-4)
    assert printed["augment"]["std"][0] == pytest.approx(pixels.std(), abs=1e-4)


# ------------------------------------------- 4-band uint16 GeoTIFFs + masks in another CRS
@pytest.mark.slow
def test_geotiff_scenes_with_mask_rasters_in_another_crs(tmp_path):
    root = tmp_path / "labeled"
    write_scenes(root)
    out = tmp_path / "run"
    rc = main(["run", str(RECIPES / "own_geotiff.yaml"), "--out", str(out),
               *sets(f"data.path={root / 'scenes'}", f"finetune.path={root}",
                     "data.options.items_per_epoch=64", *TINY,
                     "finetune.image_size=32", "finetune.tasks=[linear_probe]")])
    assert rc == 0
    saved = yaml.safe_load((out / "pretrain" / "recipe.yaml").read_text())
    assert saved["data"]["bit_depth"] == 12
    assert len(saved["augment"]["mean"]) == 4 and len(saved["augment"]["std"]) == 4
    results = json.loads((out / "results.json").read_text())
    record = results["data"]["splits"]
    assert record["method"] == "scenes"  # three scenes: split by scene, never by window
    scenes = [set(record[s]) for s in ("train", "val", "test")]
    assert not (scenes[0] & scenes[1] or scenes[0] & scenes[2] or scenes[1] & scenes[2])
    assert "linear_probe" in next(iter(results["pretrained"]))


def test_geotiff_recipe_without_finetune_path_is_one_line(tmp_path, capsys):
    root = tmp_path / "labeled"
    write_scenes(root, n=1, size=96)
    rc = main(["run", str(RECIPES / "own_geotiff.yaml"), "--out", str(tmp_path / "run"),
               *sets(f"data.path={root / 'scenes'}", *TINY)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "finetune.path" in err
    assert not (tmp_path / "run" / "results.json").exists()


# ----------------------------------------------------------------------- PIDray / SIXray roots
@pytest.mark.slow
def test_pidray_and_sixray_roots(tmp_path):
    data = tmp_path / "data"
    assert main(["data", "synth", "xray", "--out", str(data), "--n", "16"]) == 0
    out = tmp_path / "run"
    rc = main(["run", "demo", "--out", str(out),
               *sets(f"pairs.options.pidray_root={data / 'pidray'}",
                     f"pairs.options.sixray_root={data / 'sixray'}",
                     f"finetune.path={data / 'pidray'}", *TINY,
                     "finetune.inits=[pretrained, random]", "model.split_bn_groups=2")])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["dataset"] == "pidray"
    assert set(results["data"]["eval_splits"]) == {"easy", "hard", "hidden"}
