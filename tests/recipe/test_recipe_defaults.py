"""The shipped recipes' momentum-encoder defaults fit their budgets: constant momentum over a
short run, split key BatchNorm on one device (and a batch that splits evenly)."""

import json
from pathlib import Path

import pytest
import torch
from helpers import load_shipped_recipe

from densessl import cli
from densessl.errors import RecipeError
from densessl.methods.dense_pretraining import DensePretraining
from densessl.models import cosine_momentum
from densessl.models.split_batchnorm import SplitBatchNorm2d
from densessl.recipe import demo_recipe_path, load_recipe, read_recipe_dict

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def test_every_recipe_is_found():
    names = {p.stem for p in RECIPES}
    assert {"demo", "xray_segloc", "xray_insloc", "same_image"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_short_recipes_keep_momentum_constant_and_split_key_bn(path):
    recipe = load_shipped_recipe(path)
    m, t = recipe.model, recipe.train
    assert t.max_steps <= 1000 and t.devices == 1  # the budget these defaults are for
    # the momentum actually used at every step of the run stays at its start value
    used = {round(cosine_momentum(step, t.max_steps, m.momentum, m.momentum_end), 12)
            for step in range(t.max_steps)}
    assert used == {m.momentum} and m.momentum == pytest.approx(0.99)
    assert m.key_bn == "split" and t.batch_size % m.split_bn_groups == 0


def test_split_groups_must_divide_the_batch():
    path = next(p for p in RECIPES if p.stem == "demo")
    with pytest.raises(RecipeError, match=r"model\.split_bn_groups: 4 sub-batches do not divide "
                                          r"train\.batch_size 6.*\[2, 3, 6\]"):
        load_recipe(path, ["train.batch_size=6"])
    load_recipe(path, ["train.batch_size=6", "model.key_bn=batch"])  # only split needs it


def test_split_groups_need_two_samples_each():
    path = next(p for p in RECIPES if p.stem == "demo")
    with pytest.raises(RecipeError, match=r"4 sub-batches of train\.batch_size 4 leave fewer "
                                          r"than 2 samples each.*at most 2 groups"):
        load_recipe(path, ["train.batch_size=4"])
    load_recipe(path, ["train.batch_size=4", "model.split_bn_groups=2"])


def test_one_step_segloc_pretrain_with_split_key_bn(tmp_path, capsys):
    path = next(p for p in RECIPES if p.stem == "xray_segloc")
    overrides = ["train.max_steps=1", "train.batch_size=8", "train.num_workers=0",
                 "data.image_size=64", "augment.view_size=48",
                 f"pairs.options.cache_dir={tmp_path / 'cache'}"]
    recipe = load_recipe(path, overrides)
    assert recipe.loss.queue == "per_class" and recipe.model.key_bn == "split"
    task = DensePretraining(recipe)
    for branch in (task.model.online, task.model.momentum):
        bns = [mod for mod in branch.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
        assert bns and all(isinstance(b, SplitBatchNorm2d) and b.groups == 4 for b in bns)
    out = tmp_path / "run"
    args = ["pretrain", str(path), "--out", str(out)]
    for item in overrides:
        args += ["--set", item]
    assert cli.main(args) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 1 and torch.isfinite(torch.tensor(metrics["final"]["loss"]))


def test_the_python_api_accepts_demo_like_the_cli():
    from densessl.recipe import demo_recipe_path
    from densessl.sweep import load_sweep

    packaged = load_recipe(demo_recipe_path())
    assert load_recipe("demo") == packaged
    assert load_recipe("demo", ["train.max_steps=3"]).train.max_steps == 3
    _, base, _ = load_sweep({"name": "s", "base": "demo", "grid": {"seed": [0]}})
    assert load_recipe(base) == packaged
    with pytest.raises(RecipeError, match="not found"):
        load_recipe("demo.yaml-that-does-not-exist")


def test_recipe_base_merges_sections_and_refuses_loops(tmp_path):
    import yaml

    from densessl.errors import RecipeError

    (tmp_path / "sub").mkdir()
    (tmp_path / "parent.yaml").write_text(yaml.safe_dump({
        "name": "parent", "train": {"lr": 0.5, "max_steps": 7},
        "pairs": {"builder": "same_image", "options": {"a": 1, "b": [1, 2]}}}))
    (tmp_path / "sub" / "child.yaml").write_text(yaml.safe_dump({
        "base": "../parent.yaml", "name": "child", "train": {"max_steps": 9},
        "pairs": {"options": {"b": [3], "c": None}}}))
    data = read_recipe_dict(tmp_path / "sub" / "child.yaml")
    assert data == {"name": "child", "train": {"lr": 0.5, "max_steps": 9},
                    "pairs": {"builder": "same_image", "options": {"a": 1, "b": [3], "c": None}}}
    # the shipped demo is xray_segloc plus its own keys, resolved the same way
    demo, segloc = load_recipe("demo"), load_recipe(Path(demo_recipe_path()).parent
                                                    / "xray_segloc.yaml")
    assert demo.model == segloc.model and demo.loss == segloc.loss and demo.train.lr == 0.03
    (tmp_path / "loop_a.yaml").write_text("base: loop_b.yaml\n")
    (tmp_path / "loop_b.yaml").write_text("base: loop_a.yaml\n")
    with pytest.raises(RecipeError, match="inherit in a loop"):
        read_recipe_dict(tmp_path / "loop_a.yaml")
    (tmp_path / "orphan.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(RecipeError, match=r"orphan\.yaml: base: .*nowhere\.yaml' not found"):
        read_recipe_dict(tmp_path / "orphan.yaml")
