"""``loss.num_classes`` defaults to null: the largest class id the pair builder emits + 1,
resolved when the builder is built and recorded in recipe.yaml and metrics.json."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import small_xray_pretrain_args

from densessl import cli
from densessl.errors import RecipeError
from densessl.methods import DensePretraining
from densessl.recipe import load_recipe
from densessl.workflows.pretraining import check_class_ids

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SAME_IMAGE = str(RECIPES / "same_image.yaml")


class Emits:
    def __init__(self, ids):
        self.ids = ids

    def label_ids(self):
        return set(self.ids)


class Wrapper:  # as NoisyPairs wraps a builder: wrapped_objects follows ``builder``
    def __init__(self, builder):
        self.builder = builder


def test_the_default_is_from_the_data():
    assert load_recipe(SAME_IMAGE).loss.num_classes is None


@pytest.mark.parametrize("queue", ["per_class", "single"])
def test_null_resolves_to_the_largest_id_plus_one(queue):
    recipe = load_recipe(SAME_IMAGE, [f"loss.queue={queue}"])
    check_class_ids(recipe, Emits({-1, 2, 7, 3}))  # -1 (unknown) is no ring
    assert recipe.loss.num_classes == 8
    wrapped = load_recipe(SAME_IMAGE, [f"loss.queue={queue}"])
    check_class_ids(wrapped, Wrapper(Emits({0, 4})))
    assert wrapped.loss.num_classes == 5


def test_an_explicit_value_is_kept_and_still_checked():
    recipe = load_recipe(SAME_IMAGE, ["loss.queue=per_class", "loss.num_classes=20"])
    check_class_ids(recipe, Emits({1, 12}))
    assert recipe.loss.num_classes == 20
    low = load_recipe(SAME_IMAGE, ["loss.queue=per_class", "loss.num_classes=4"])
    with pytest.raises(RecipeError, match=r"loss\.num_classes: 4, .*ids up to 12.*>= 13"):
        check_class_ids(low, Emits({1, 12}))


def test_per_class_queues_without_ids_or_resolution_are_refused():
    recipe = load_recipe(SAME_IMAGE, ["loss.queue=per_class"])
    with pytest.raises(RecipeError, match=r"loss\.num_classes: null .*'same_image' reports "
                       r"none .*set loss\.num_classes"):
        check_class_ids(recipe, object())
    single = load_recipe(SAME_IMAGE)
    check_class_ids(single, object())  # one queue reads no ids: nothing to resolve
    assert single.loss.num_classes is None
    with pytest.raises(RecipeError, match=r"loss\.num_classes: null .*not resolved"):
        DensePretraining(recipe)  # the rings cannot be sized


def test_pretraining_records_the_resolved_value(tmp_path, capsys):
    # the SegLoc recipe with its classes filtered to PIDray ids 2 and 5: 6 rings, not 13
    out = tmp_path / "run"
    code = cli.main(small_xray_pretrain_args(
        out, tmp_path / "cache", "loss.num_classes=null", "pairs.options.classes=[2, 5]",
        "train.max_steps=1", "train.batch_size=4", "model.split_bn_groups=2"))
    assert code == 0, capsys.readouterr().err
    assert yaml.safe_load((out / "recipe.yaml").read_text())["loss"]["num_classes"] == 6
    assert json.loads((out / "metrics.json").read_text())["num_classes"] == 6
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["recipe"]["loss"]["num_classes"] == 6
