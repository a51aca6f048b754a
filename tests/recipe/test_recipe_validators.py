"""Cross-field checks that depend only on the recipe are Recipe validators: constructing the
Recipe refuses the combination, and so does ``densessl recipe`` (exit 2, one error line),
before any data is read or any model is built."""

import re

import pytest

from densessl.cli import main
from densessl.errors import RecipeError
from densessl.recipe import Recipe, apply_overrides, load_recipe

# (overrides on the demo recipe, the message; a regex)
CASES = {
    "mean_per_channel": (["augment.mean=[0.5, 0.5]"],
                         r"augment\.mean: 2 values \[0\.5, 0\.5\] for data\.channels 3"),
    "std_per_channel": (["data.channels=4", "augment.std=[0.2, 0.2, 0.2]"],
                        r"augment\.std: 3 values .* for data\.channels 4"),
    "view_on_dense_grid": (["augment.view_size=60"],
                           r"augment\.view_size 60 is not a multiple of model\.dense_stride 8 "
                           r".*use 56 or 64"),
    "instance_needs_fpn": (["loss.instance.weight=1.0", "model.neck=none"],
                           r"loss\.instance\.weight 1\.0 > 0 needs model\.neck: fpn, got 'none'"),
    "label_free_reads_no_class_ids": (
        ["finetune.label_free_set={loss.dense.temperature: 0.1}"],
        r"finetune\.label_free_set \{'loss\.dense\.temperature': 0\.1\}: the control still reads "
        r"class ids \(per-class queues\)"),
    "label_free_set_is_valid": (
        ["finetune.label_free_set={loss.queue: none}"],
        r"finetune\.label_free_set .*: the control recipe is invalid .*loss\.queue"),
}


@pytest.fixture(scope="module")
def demo():
    recipe = load_recipe("demo")
    # the demo compares the label-free control, with per-class queues: every check applies
    assert "label_free" in recipe.finetune.inits and recipe.loss.queue == "per_class"
    return recipe


@pytest.mark.parametrize("case", sorted(CASES))
def test_recipe_construction_refuses(case, demo):
    overrides, message = CASES[case]
    with pytest.raises(RecipeError, match=message):
        load_recipe("demo", overrides)
    # Recipe(...) directly: the same validators (pydantic's own error type then)
    data = load_recipe("demo").model_dump(mode="json")
    with pytest.raises(ValueError, match=message):
        Recipe.model_validate(apply_overrides(data, overrides))


@pytest.mark.parametrize("case", sorted(CASES))
def test_densessl_recipe_refuses(case, capsys):
    overrides, message = CASES[case]
    args = ["recipe", "demo"] + [a for o in overrides for a in ("--set", o)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: recipe ") and err.count("\n") == 1
    assert "Value error" not in err  # pydantic's prefix is not the user's business
    assert re.search(message, err), err


def test_the_checks_accept_what_they_should(demo):
    # one scalar for all channels; a list per channel; a view on the grid; the instance
    # objective with the FPN; a control that reads no class ids (the demo's own)
    ok = load_recipe("demo", ["data.channels=4", "augment.mean=[0.1, 0.2, 0.3, 0.4]",
                              "augment.std=0.3", "augment.view_size=56", "model.dense_stride=8",
                              "loss.instance.weight=1.0", "model.neck=fpn"])
    assert ok.augment.view_size == 56
    # without the label_free init its set is not applied, so it is not checked either
    load_recipe("demo", ["finetune.inits=[pretrained]",
                         "finetune.label_free_set={loss.dense.temperature: 0.1}"])


def test_densessl_recipe_also_applies_the_smp_input_rule(capsys):
    # not a validator (it reads smp's models), but `densessl recipe` runs it too
    assert main(["recipe", "demo", "--set", "finetune.image_size=40"]) == 2
    assert "finetune.image_size: 40 is not a multiple of 32" in capsys.readouterr().err
    assert main(["recipe", "demo"]) == 0
