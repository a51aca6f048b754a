"""Issue #28 item 1: each objective's settings in its own ``loss`` section (``loss.dense``,
``loss.global``, ``loss.instance``, ``loss.detcon``), shared ``loss.queue`` /
``loss.num_classes`` / ``loss.robust``. A former flat key is one RecipeError line naming its new
place(s); a saved recipe of before the move (a checkpoint's) reads migrated, exactly."""

from __future__ import annotations

import pytest
import yaml

from densessl.errors import RecipeError
from densessl.recipe import (
    _FORMER_FLAT,
    MOVED_LOSS_KEYS,
    Recipe,
    dump_recipe,
    load_recipe,
    migrate_flat_loss,
    parse_recipe,
)
from densessl.sweep.report import robust_key
from densessl.workflows.resume import recipe_differences


def flat_loss(recipe: Recipe) -> dict:
    """``recipe``'s loss section as recipes wrote it before the move (the former FLAT
    tables), what a checkpoint of that time holds."""
    loss = recipe.model_dump(mode="json")["loss"]
    flat = {"queue": loss["queue"], "num_classes": loss["num_classes"],
            "detcon": loss["detcon"]}
    for section, table in _FORMER_FLAT.items():
        for field, key in table.items():
            flat[key] = loss[section][field]
    return flat


@pytest.mark.parametrize("key", sorted(MOVED_LOSS_KEYS))
def test_a_former_flat_key_names_its_new_place(key):
    value = "rince" if key == "robust" else 0.3
    with pytest.raises(RecipeError) as info:
        load_recipe({"loss": {key: value}})
    message = str(info.value)
    assert f"loss.{key} moved to " in message and "\n" not in message
    for place in MOVED_LOSS_KEYS[key]:
        assert f"loss.{place}" in message


def test_temperature_names_every_place_and_overrides_are_checked_too():
    with pytest.raises(RecipeError, match=r"loss\.temperature moved to loss\.dense\.temperature, "
                       r"loss\.global\.temperature and loss\.instance\.temperature"):
        load_recipe("demo", ["loss.temperature=0.1"])
    with pytest.raises(RecipeError, match=r"loss\.dense_weight moved to loss\.dense\.weight"):
        load_recipe("demo", ["loss.dense_weight=0.5"])
    with pytest.raises(RecipeError, match=r"loss\.robust moved to loss\.robust\.kind"):
        load_recipe({"loss": {"robust": "rank"}})


def test_sections_as_a_recipe_writes_them():
    recipe = load_recipe({"loss": {"global": {"weight": 0.25}, "dense": {"temperature": 0.1},
                                   "robust": {"kind": "rank"}}})
    assert recipe.loss.global_.weight == 0.25 and recipe.loss.section("global").weight == 0.25
    assert recipe.loss.dense.temperature == 0.1 and recipe.loss.instance.temperature == 0.2
    dumped = yaml.safe_load(dump_recipe(recipe))["loss"]
    assert "global" in dumped and "global_" not in dumped
    assert load_recipe(recipe) == recipe == parse_recipe(yaml.safe_load(dump_recipe(recipe)))
    with pytest.raises(RecipeError, match=r"loss\.global\.wieght: unknown key \(did you mean "
                       r"'weight'\?"):
        load_recipe({"loss": {"global": {"wieght": 1}}})
    with pytest.raises(RecipeError, match=r"loss\.globl: unknown key \(did you mean 'global'\? "
                       r"valid keys: dense, detcon, global, instance"):
        load_recipe({"loss": {"globl": {}}})


def test_saved_flat_recipes_migrate_exactly():
    recipe = load_recipe("demo", ["loss.robust.kind=rince", "loss.robust.rince_q=0.3",
                                  "loss.dense.temperature=0.3", "loss.global.temperature=0.3",
                                  "loss.instance.temperature=0.3", "loss.global.weight=0.7"])
    saved = recipe.model_dump(mode="json")
    saved["loss"] = flat_loss(recipe)
    with pytest.raises(RecipeError, match="moved to"):
        parse_recipe(saved)
    assert parse_recipe(migrate_flat_loss(saved)) == recipe
    assert "dense_weight" in saved["loss"]  # the caller's dict is left as it was
    # a checkpoint written before the move resumes with the migrated recipe
    assert recipe_differences(saved, recipe) == []
    changed = recipe.model_copy(deep=True)
    changed.loss.instance.temperature = 0.2
    assert recipe_differences(saved, changed) == ["loss.instance.temperature: 0.3 → 0.2"]


def test_the_robust_plot_reads_old_and_new_sweeps():
    assert robust_key(["noise.kind", "loss.robust.kind", "seed"]) == "loss.robust.kind"
    assert robust_key(["noise.kind", "loss.robust", "seed"]) == "loss.robust"
    assert robust_key(["noise.kind"]) is None


def test_a_checkpoint_of_flat_keys_rebuilds_its_task():
    """Lightning rebuilds the task from the checkpoint's recipe dict (``hyper_parameters``):
    one of before the sections builds the same objectives, under the same state-dict names."""
    from densessl.methods import DensePretraining

    recipe = load_recipe({"data": {"image_size": 80, "options": {"num_images": 4}},
                          "augment": {"view_size": 64}, "model": {"key_bn": "batch"},
                          # one temperature: all a flat recipe could say
                          "loss": {"dense": {"queue_size": 32, "temperature": 0.3},
                                   "global": {"queue_size": 16, "temperature": 0.3},
                                   "instance": {"weight": 0.5, "queue_size": 8,
                                                "temperature": 0.3}},
                          "train": {"batch_size": 4}})
    saved = recipe.model_dump(mode="json")
    saved["loss"] = flat_loss(recipe)
    task = DensePretraining(saved)
    assert task.recipe == recipe
    assert [o.name for o in task.objectives] == ["dense", "global", "instance"]
    assert task.instance_loss.temperature == 0.3
    assert task.hparams["recipe"]["loss"]["instance"]["temperature"] == 0.3  # saved nested
