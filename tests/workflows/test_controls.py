"""Named pretraining controls (``finetune.controls``), the SIXray bags as a source and the
synthetic X-ray set's ``dataset_seed`` (issue #26: the X-ray benchmark's truly label-free
control, over pretraining runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from densessl.errors import RecipeError
from densessl.recipe import load_recipe
from densessl.workflows.experiment import pretraining_labels, run

RECIPES = Path(__file__).parents[2] / "recipes"
SAME_IMAGE = str(RECIPES / "same_image.yaml")
TINY = [
    "data.image_size=32", "data.options.num_images=16", "augment.view_size=32",
    "train.max_steps=2", "train.batch_size=4", "train.num_workers=0",
    "finetune.image_size=32", "finetune.batch_size=4", "finetune.num_threads=1",
    "finetune.options={num_train: 8, num_val: 4, num_source: 4}", "finetune.probe_steps=3",
    "finetune.tasks=[linear_probe]", "finetune.label_fractions=[0.5]",
    "model.split_bn_groups=2",
]


def test_inits_name_builtins_or_controls():
    with pytest.raises(RecipeError, match=r"finetune.inits: \['nope'\] are neither"):
        load_recipe(SAME_IMAGE, ["finetune.inits=[pretrained,nope]"])
    with pytest.raises(RecipeError, match=r"finetune.controls: \['random'\] are built-in"):
        load_recipe(SAME_IMAGE, ['finetune.controls={random: {"loss.dense.temperature": 0.5}}'])
    # a control's overrides are validated as a recipe, naming the control
    with pytest.raises(RecipeError, match=r"finetune.controls.hot .*invalid"):
        load_recipe(SAME_IMAGE, ['finetune.controls={hot: {"loss.dense.temperature": -1}}',
                                 "finetune.inits=[pretrained,hot]"])


def test_the_benchmark_control_reads_no_masks_and_no_classes():
    recipe = load_recipe(RECIPES / "benchmarks" / "xray.yaml")
    control = recipe.control_recipe("bags_same_image")
    assert (control.pairs.builder, control.data.source) == ("same_image", "sixray")
    assert control.train.max_steps == recipe.train.max_steps  # same budget
    assert control.finetune.controls == {}
    assert pretraining_labels(control) == "none"
    # the cut-paste controls read segment masks (and the pretrained one class ids too)
    assert "segment masks" in pretraining_labels(recipe.control_recipe("label_free"))
    assert "class ids" in pretraining_labels(recipe)
    assert len(recipe.finetune.pretrain_seeds) >= 5


def test_a_control_is_pretrained_per_seed_and_scored_as_its_own_init(tmp_path):
    control = {"loss.dense.temperature": 0.5, "augment.geometry.crop_scale": [0.8, 1.0]}
    overrides = TINY + [f"finetune.controls={json.dumps({'narrow': control})}",
                        "finetune.inits=[pretrained,narrow,random]",
                        "finetune.pretrain_seeds=[3,4]", "finetune.seeds=[0]"]
    results = run(SAME_IMAGE, tmp_path, overrides=overrides, log=lambda *a: None)
    for seed in (3, 4):
        saved = load_recipe(tmp_path / "pretrain_narrow" / f"seed{seed}" / "recipe.yaml")
        assert saved.loss.dense.temperature == 0.5 and saved.seed == seed
        assert tuple(saved.augment.geometry.crop_scale) == (0.8, 1.0)
    a = torch.load(tmp_path / "pretrain" / "seed3" / "encoder.pt")
    b = torch.load(tmp_path / "pretrain_narrow" / "seed3" / "encoder.pt")
    assert not torch.equal(a["conv1.weight"], b["conv1.weight"])
    assert results["narrow"]["linear_probe@50%"]["n_seeds"] == 2
    assert results["differences"]["narrow - random"]["linear_probe@50%"]["mIoU"]["n"] == 2
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert [Path(w).parent.parent.name for w in runs["control_weights"]["narrow"]] == \
        ["pretrain_narrow"] * 2


def test_sixray_source_without_root_reads_the_synthetic_bags(tmp_path):
    from densessl.data.registry import SOURCES

    bags = SOURCES["sixray"](None, image_size=32, synthetic_n=8, cache_dir=str(tmp_path))
    root = tmp_path / "synthetic" / "xray-n8-seed0" / "sixray"
    csv = next((root / "ImageSet").glob("*/train.csv"))
    negatives = [line for line in csv.read_text().splitlines()[1:]
                 if line and all(v.strip() != "1" for v in line.split(",")[1:])]
    assert len(bags) == len(negatives) > 0
    assert all(Path(file).parent == root / "JPEGImage" for file, _ in bags.items)
    assert bags[0]["image"].shape == (3, 32, 32)


def test_the_synthetic_xray_set_does_not_follow_the_run_seed(tmp_path):
    """Pretraining seeds vary the run, not the data: every seed pastes from the set that
    finetune.dataset: pidray scores on (dataset_seed)."""
    from densessl.build import build_pair_builder
    from densessl.workflows.experiment import finetune_data_defaults

    sets = []
    for seed in (0, 3):
        recipe = load_recipe(RECIPES / "xray_segloc.yaml",
                             [f"seed={seed}", f"pairs.options.cache_dir={tmp_path}",
                              "pairs.options.synthetic_n=8"])
        builder = build_pair_builder(recipe)
        sets.append(Path(builder.backgrounds.root))
        assert finetune_data_defaults(recipe).finetune.options.get("dataset_seed") is None
    assert sets[0] == sets[1] == tmp_path / "synthetic" / "xray-n8-seed0" / "sixray"
    recipe = load_recipe(RECIPES / "xray_segloc.yaml",
                         [f"pairs.options.cache_dir={tmp_path}", "pairs.options.synthetic_n=8",
                          "pairs.options.dataset_seed=2"])
    assert finetune_data_defaults(recipe).finetune.options["dataset_seed"] == 2
