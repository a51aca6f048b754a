"""Every shipped domain recipe scores on its own domain's test splits, never silently on the
built-in synthetic shapes: ``densessl run`` on xray_segloc / xray_insloc (PIDray easy / hard /
hidden, probe mIoU and COCO box AP / AP50 / AP75 / AR@100 per subset), xbd_temporal (xBD's test
split with the xView2 score) and geotiff_temporal (the user's scenes + mask rasters), at a
budget a test can afford, on data in the real formats written by ``densessl data synth`` or
here. ``finetune.path: null`` follows the pretraining root; a recipe that needs a path it does
not have, or that would score pretraining on other data against the shapes, stops in one line
before pretraining."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from geo_fixtures import write_scenes
from helpers import WALKTHROUGH_TINY as TINY
from helpers import set_args as sets

from densessl.cli import main
from densessl.errors import RecipeError
from densessl.recipe import load_recipe
from densessl.workflows.experiment import check_finetune_dataset, finetune_data_defaults

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
PIDRAY_SUBSETS = {"easy", "hard", "hidden"}
BOX = ("box_mAP", "box_AP50", "box_AP75", "box_AR100")
#: two inits are enough to show the structure (one pretraining), on narrow heads
FAST = [*TINY, "finetune.inits=[pretrained, random]", "finetune.num_threads=1",
        "model.neck_dim=32", "model.dense_dim=32", "model.global_dim=32"]


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _cell(results: dict, init: str, task: str) -> dict:
    return next(v for k, v in results[init].items() if k.startswith(task))


# ------------------------------------------------------------------------- PIDray: X-ray
@pytest.fixture(scope="module")
def xray_roots(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("xray")
    assert main(["data", "synth", "xray", "--out", str(data), "--n", "16"]) == 0
    return data


def _check_pidray(results: dict, root: Path) -> None:
    assert results["data"]["dataset"] == "pidray"
    assert set(results["data"]["eval_splits"]) == PIDRAY_SUBSETS
    assert Path(results["data"]["splits"]["root"]) == root  # scored on the pretraining root
    for init in ("pretrained", "random"):
        probe, detection = (_cell(results, init, t) for t in ("linear_probe", "detection"))
        for subset in PIDRAY_SUBSETS:
            assert 0.0 <= probe[f"{subset}/mIoU"] <= 1.0
            for metric in BOX:  # COCO AP / AR reported per test subset
                value = detection[f"{subset}/{metric}"]
                assert value != value or 0.0 <= value <= 1.0  # NaN: nothing to score


@pytest.mark.slow
def test_xray_segloc_scores_on_the_pidray_root_it_pastes_from(xray_roots, tmp_path):
    out = tmp_path / "run"
    pidray = xray_roots / "pidray"
    # finetune.path is not set: it follows pairs.options.pidray_root
    rc = main(["run", str(RECIPES / "xray_segloc.yaml"), "--out", str(out),
               *sets(f"pairs.options.pidray_root={pidray}",
                     f"pairs.options.sixray_root={xray_roots / 'sixray'}", *FAST)])
    assert rc == 0
    results = _results(out)
    assert results["data"]["path"] == str(pidray)
    _check_pidray(results, pidray)
    saved = yaml.safe_load((out / "pretrain" / "recipe.yaml").read_text())
    assert saved["finetune"]["path"] == str(pidray)  # recorded with the pretraining


@pytest.mark.slow
def test_xray_insloc_scores_on_the_synthetic_set_it_pastes_from(tmp_path):
    """No roots: fine-tuning reads the very synthetic PIDray-format set pretraining pasted
    from (the pairs' synthetic_n and cache_dir), and its test subsets."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    rc = main(["run", str(RECIPES / "xray_insloc.yaml"), "--out", str(out),
               *sets("pairs.options.synthetic_n=16", f"pairs.options.cache_dir={cache}",
                     "loss.instance.roi_head_fc_dim=32", *FAST)])
    assert rc == 0
    results = _results(out)
    assert results["data"]["path"] is None
    _check_pidray(results, cache / "synthetic" / "xray-n16-seed0" / "pidray")
    assert sorted(p.name for p in (cache / "synthetic").iterdir()) == ["xray-n16-seed0"]


# ------------------------------------------------------------------------------------ xBD
def _xbd_with_test_split(root: Path, n: int = 8, held: int = 2) -> list[str]:
    """``densessl data synth xbd`` (train/ only), then the last ``held`` pairs moved to test/
    as in the real release; returns the moved pairs."""
    assert main(["data", "synth", "xbd", "--out", str(root), "--n", str(n)]) == 0
    bases = sorted({p.name.rsplit("_", 2)[0] for p in (root / "train" / "images").iterdir()})
    moved = bases[-held:]
    for folder in ("images", "labels", "targets"):
        (root / "test" / folder).mkdir(parents=True)
        for base in moved:
            for f in (root / "train" / folder).glob(f"{base}_*"):
                shutil.move(str(f), root / "test" / folder / f.name)
    return moved


@pytest.mark.slow
def test_xbd_temporal_scores_on_the_test_split_of_its_root(tmp_path):
    root = tmp_path / "xbd"
    moved = _xbd_with_test_split(root)
    out = tmp_path / "run"
    rc = main(["run", str(RECIPES / "xbd_temporal.yaml"), "--out", str(out),
               *sets(f"data.path={root}", "data.options.tiles_per_pair=1", *FAST,
                     "finetune.image_size=32", "augment.view_size=32")])
    assert rc == 0
    results = _results(out)
    data = results["data"]
    assert data["dataset"] == "xbd" and data["path"] == str(root)
    assert data["eval_splits"] == {"test": len(moved)}
    assert data["splits"] == {"method": "folders", "train": ["train"], "test": ["test"],
                              "val": ["test"]}
    for init in ("pretrained", "random"):
        for task in ("linear_probe", "segmentation"):
            scores = _cell(results, init, task)
            assert 0.0 <= scores["mIoU"] <= 1.0
            assert 0.0 <= scores["xview2_score"] <= 1.0


# ------------------------------------------------------------------- GeoTIFF + mask rasters
@pytest.mark.slow
def test_geotiff_temporal_scores_on_the_labeled_scenes(tmp_path):
    labeled = tmp_path / "labeled"
    write_scenes(labeled)
    out = tmp_path / "run"
    rc = main(["run", str(RECIPES / "geotiff_temporal.yaml"), "--out", str(out),
               *sets(f"finetune.path={labeled}", f"data.options.cache_dir={tmp_path / 'cache'}",
                     "data.options.tiles_per_pair=1", *FAST, "finetune.image_size=32",
                     "augment.view_size=32", "data.image_size=48")])
    assert rc == 0
    results = _results(out)
    data = results["data"]
    assert data["dataset"] == "geotiff_masks" and data["path"] == str(labeled)
    assert set(data["eval_splits"]) == {"test"} and data["eval_splits"]["test"] > 0
    assert data["splits"]["method"] == "scenes" and len(data["splits"]["test"]) == 1
    for init in ("pretrained", "random"):
        for task in ("linear_probe", "segmentation"):
            assert 0.0 <= _cell(results, init, task)["mIoU"] <= 1.0


def test_geotiff_temporal_without_finetune_path_is_one_line_before_pretraining(tmp_path,
                                                                               capsys):
    out = tmp_path / "run"
    rc = main(["run", str(RECIPES / "geotiff_temporal.yaml"), "--out", str(out),
               *sets(f"data.options.cache_dir={tmp_path / 'cache'}", *TINY)])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "finetune.path" in err, err
    assert not out.exists() and not (tmp_path / "cache").exists()  # nothing written


# ------------------------------------------------- never silently the synthetic shapes
def test_a_recipe_without_finetune_dataset_on_other_data_is_refused(tmp_path, capsys):
    recipe = tmp_path / "mine.yaml"  # a user recipe: own images, no finetune section
    recipe.write_text(yaml.safe_dump({"name": "mine", "data": {"source": "folder",
                                                               "path": str(tmp_path / "bags")}}))
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "finetune.dataset: not set" in err and "data.source folder" in err, err
    assert not out.exists()
    # the builder's own data (cut_paste on its synthetic X-ray set) is not the shapes either
    with pytest.raises(RecipeError, match="cut_paste builder's own data"):
        check_finetune_dataset(load_recipe({"pairs": {"builder": "cut_paste"}}))
    # named on purpose (also with --set): runs, with a warning line
    lines: list[str] = []
    check_finetune_dataset(load_recipe(recipe, ["finetune.dataset=synthetic"]), lines.append)
    assert len(lines) == 1 and lines[0].startswith("warning: finetune.dataset is synthetic")
    # pretraining on the shapes themselves: nothing to say
    lines.clear()
    check_finetune_dataset(load_recipe(RECIPES / "same_image.yaml"), lines.append)
    check_finetune_dataset(load_recipe({}), lines.append)
    assert lines == []


def test_finetune_path_follows_the_pretraining_root():
    segloc = RECIPES / "xray_segloc.yaml"
    resolved = finetune_data_defaults(load_recipe(segloc, ["pairs.options.pidray_root=/d/p"]))
    assert resolved.finetune.path == "/d/p" and resolved.finetune.options == {}
    # a finetune.path that is set wins
    own = load_recipe(segloc, ["pairs.options.pidray_root=/d/p", "finetune.path=/d/q"])
    assert finetune_data_defaults(own).finetune.path == "/d/q"
    # no root: the pretraining's synthetic set (unless finetune.options names another)
    synth = finetune_data_defaults(load_recipe(segloc, [
        "pairs.options.synthetic_n=16", "pairs.options.cache_dir=/c",
        "finetune.options={synthetic_n: 24}"]))
    assert synth.finetune.path is None
    assert synth.finetune.options == {"synthetic_n": 24, "cache_dir": "/c"}
    xbd = RECIPES / "xbd_temporal.yaml"
    assert finetune_data_defaults(load_recipe(xbd, ["data.path=/x"])).finetune.path == "/x"
    # a dataset that is not the pretraining data's own is left alone
    geo = finetune_data_defaults(load_recipe(RECIPES / "geotiff_temporal.yaml",
                                             ["data.path=/s2"]))
    assert geo.finetune.path is None
    demo = finetune_data_defaults(load_recipe("demo", ["pairs.options.pidray_root=/d/p"]))
    assert demo.finetune.path == "/d/p" and demo.finetune.tasks == ["linear_probe"]
