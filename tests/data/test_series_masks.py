"""The synthetic 8-date GeoTIFF series with land-cover masks (``geotiff-series-masks``): the
masks are the truth of the rendered pixels and lie on the scenes' grid, train and test places
never share a scene, pretraining (``data.options.synthetic_series``) and the probe
(``finetune.dataset: geotiff_series_masks``) read one cached set, and the sweep that compares
``pairs.options.dates`` (recipes/sweeps/temporal_dates.yaml) resolves to valid cells."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

from densessl.data.geotiff import GeoTiffPairs
from densessl.data.geotiff_synth import (
    _BARE_SOIL,
    LAND_COVER,
    MASK_NODATA,
    SERIES_CHANGE_AFTER,
    SERIES_DATES,
    place_splits,
    synthesize_geotiff_series_masks,
)
from densessl.data.labeled.build import build_eval_dataset
from densessl.data.labeled.geotiff_masks import _same_grid

ROOT = Path(__file__).resolve().parents[2]
SWEEP = ROOT / "recipes" / "sweeps" / "temporal_dates.yaml"
ROOF = np.linspace(0.35, 0.55, 4)
BUILDING, BARE, FIELD = (LAND_COVER.index(c) for c in ("building", "bare_soil", "field"))


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return synthesize_geotiff_series_masks(tmp_path_factory.mktemp("synth"), 3, seed=2, size=72)


def _read(path: Path):
    with rasterio.open(path) as src:
        return src.read(), src.crs, src.transform, src.nodata


def test_masks_are_the_truth_of_the_rendered_pixels(synth):
    labeled = synth / "labeled"
    scenes = sorted((labeled / "scenes").glob("*.tif"))
    assert len(scenes) == 3 * (len(SERIES_DATES) - 1)  # all but the Web-Mercator date
    for path in scenes:
        data, _, _, _ = _read(path)
        (ids,), _, _, nodata = _read(labeled / "masks" / path.name)
        assert nodata == MASK_NODATA
        assert ((data == 0).all(0) == (ids == MASK_NODATA)).all()  # ignored = scene nodata
        reflectance = (data.astype(np.float64) - 1) / 9999  # as the series stores it
        date_index = SERIES_DATES.index(path.stem.rsplit("_", 1)[1])
        means = {c: reflectance[:, ids == c].mean(1) for c in range(len(LAND_COVER))
                 if (ids == c).any()}
        # every class drawn, per class band means: roofs and bare soil have their signature
        assert np.abs(means[BUILDING] - ROOF).max() < 1e-4
        assert (BARE in means) == (date_index > SERIES_CHANGE_AFTER)
        if BARE in means:
            assert np.abs(means[BARE] - _BARE_SOIL).max() < 1e-4
        # and the other way: a pixel with a signature is labeled as that class, no other
        valid = ids != MASK_NODATA
        roof_like = (np.abs(reflectance - ROOF[:, None, None]) < 1e-4).all(0) & valid
        soil_like = (np.abs(reflectance - _BARE_SOIL[:, None, None]) < 1e-4).all(0) & valid
        assert (roof_like == (ids == BUILDING)).all() and (soil_like == (ids == BARE)).all()
        # fields: one crop spectrum per field (at most 4); terrain: smooth noise
        assert len(np.unique(reflectance[:, ids == FIELD].round(4), axis=1).T) <= 4
        assert len(np.unique(reflectance[:, ids == 0].round(4), axis=1).T) > 50
    # the abrupt change: three more buildings after it, same ground otherwise
    place = scenes[0].stem.rsplit("_", 1)[0]
    before, after = (_read(labeled / "masks" / f"{place}_{SERIES_DATES[i]}.tif")[0][0]
                     for i in (0, len(SERIES_DATES) - 1))
    assert ((before == BUILDING) <= (after == BUILDING)).all()
    assert (after == BUILDING).sum() > (before == BUILDING).sum()


def test_masks_align_with_the_scenes_which_are_the_series_files(synth):
    labeled = synth / "labeled"
    for path in sorted((labeled / "scenes").glob("*.tif")):
        with rasterio.open(path) as scene, rasterio.open(labeled / "masks" / path.name) as mask:
            assert scene.crs == mask.crs and scene.transform == mask.transform
            assert (scene.width, scene.height) == (mask.width, mask.height)
            assert _same_grid(scene, mask) and mask.count == 1 and mask.dtypes[0] == "uint8"
        # the labeled scene is the file pretraining reads
        assert path.read_bytes() == (synth / "series" / path.name).read_bytes()


def test_train_and_test_places_are_disjoint(synth):
    def places(name):
        stems = (synth / "labeled" / "splits" / f"{name}.txt").read_text().split()
        return {s.rsplit("_", 1)[0] for s in stems}, stems

    (train, train_stems), (test, test_stems) = places("train"), places("test")
    assert train and test and not train & test
    scenes = {p.stem for p in (synth / "labeled" / "scenes").glob("*.tif")}
    assert set(train_stems) | set(test_stems) == scenes  # every date of a place in its split
    assert (synth / "labeled" / "classes.txt").read_text().split() == list(LAND_COVER)
    for n in (2, 3, 4, 8, 30):
        split = place_splits(n)
        assert split["test"] and split["train"] and not set(split["test"]) & set(split["train"])
        assert sorted(split["train"] + split["test"]) == list(range(n))
    with pytest.raises(ValueError, match=">= 2 places"):
        place_splits(1)


def test_pretraining_and_the_probe_read_one_cached_set(tmp_path):
    cache = str(tmp_path / "cache")
    # the run's seed (5) does not change the data when dataset_seed is set
    source = GeoTiffPairs(None, image_size=64, channels=4, seed=5, synthetic_series=True,
                          synthetic_places=3, dataset_seed=0, cache_dir=cache,
                          tiles_per_pair=1, scaling="bit_depth")
    data = build_eval_dataset("geotiff_series_masks",
                              {"synthetic_places": 3, "dataset_seed": 0, "cache_dir": cache},
                              image_size=64, channels=4, seed=1, bit_depth=source.bit_depth)
    root = Path(data.split_record["root"])
    assert root.parent == tmp_path / "cache" / "synthetic" / "geotiff-series-masks-n3-seed0"
    read = {r.path for p in source.pairs for r in (p.early, p.late)}
    assert {p.parent for p in read} == {root.parent / "series"}
    assert {p.stem for p in (root / "scenes").glob("*.tif")} < {p.stem for p in read}
    assert len(list((tmp_path / "cache" / "synthetic").iterdir())) == 1  # generated once
    assert data.class_names == list(LAND_COVER) and data.bit_depth == source.bit_depth
    record = data.split_record
    assert record["method"] == "files" and len(data.train) and len(data.test["test"])
    places = {name: {s.rsplit("_", 1)[0] for s in record[name]} for name in ("train", "test")}
    assert places["train"] and places["test"] and not places["train"] & places["test"]
    assert data.cards[0]["licence"].startswith("Apache-2.0")


def test_the_series_masks_dataset_refuses_a_path_and_too_few_places(tmp_path):
    from densessl.errors import RecipeError

    with pytest.raises(RecipeError, match="finetune.path"):
        build_eval_dataset("geotiff_series_masks", {}, path="/data/x", channels=4)
    with pytest.raises(RecipeError, match="synthetic_places"):
        build_eval_dataset("geotiff_series_masks", {"synthetic_places": 1,
                                                    "cache_dir": str(tmp_path)}, channels=4)
    with pytest.raises(RecipeError, match="split"):
        build_eval_dataset("geotiff_series_masks", {"split": "scenes"}, channels=4)


def test_the_temporal_dates_sweep_resolves_to_nine_valid_cells():
    from densessl.data.labeled.build import EVAL_DATASETS
    from densessl.data.registry import SOURCES
    from densessl.options import check_option_types
    from densessl.sweep.runner import plan

    assert SWEEP in set(SWEEP.parent.glob("*.yaml"))  # test_sweep's shipped-sweeps check
    spec, cells = plan(SWEEP)
    grid = {(p["pairs.options.dates"], p["seed"]) for p, _, _ in cells}
    assert grid == {(d, s) for d in ("any", "adjacent", "near_far") for s in (0, 1, 2)}
    assert len({i for _, _, i in cells}) == 9
    for _, recipe, _ in cells:
        data, ft = recipe["data"]["options"], recipe["finetune"]
        assert data["synthetic_series"] and recipe["data"]["path"] is None
        assert ft["dataset"] == "geotiff_series_masks" and ft["tasks"] == ["linear_probe"]
        assert ft["inits"] == ["pretrained", "random"] and ft["seeds"] == [0]
        for key in ("synthetic_places", "dataset_seed", "cache_dir"):  # the same cached set
            assert ft["options"].get(key) == data.get(key), key
        check_option_types(SOURCES["geotiff"], data, "data.options", "geotiff")
        check_option_types(EVAL_DATASETS["geotiff_series_masks"], ft["options"],
                           "finetune.options", "geotiff_series_masks")


@pytest.mark.slow
def test_run_on_the_synthetic_series_scores_its_masks(tmp_path, one_thread):
    from helpers import WALKTHROUGH_TINY as TINY
    from helpers import set_args as sets

    from densessl.cli import main

    cache, out = tmp_path / "cache", tmp_path / "run"
    rc = main(["run", str(ROOT / "recipes" / "geotiff_temporal.yaml"), "--out", str(out),
               *sets("data.options.synthetic_series=true", "data.options.synthetic_places=3",
                     f"data.options.cache_dir={cache}", "data.options.tiles_per_pair=1",
                     "pairs.options.dates=near_far", "finetune.dataset=geotiff_series_masks",
                     f"finetune.options={{synthetic_places: 3, cache_dir: {cache}}}",
                     *TINY, "finetune.tasks=[linear_probe]", "finetune.probe_steps=5",
                     "finetune.inits=[pretrained, random]", "model.neck_dim=32",
                     "model.dense_dim=32", "model.global_dim=32")])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["dataset"] == "geotiff_series_masks"
    assert set(results["data"]["eval_splits"]) == {"test"}
    for init in ("pretrained", "random"):
        probe = next(v for k, v in results[init].items() if k.startswith("linear_probe"))
        assert 0.0 <= probe["mIoU"] <= 1.0 and "IoU_building" in probe
    assert len(list((cache / "synthetic").iterdir())) == 1  # one set for both
