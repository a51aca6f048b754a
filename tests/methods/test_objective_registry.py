"""Issue #28 item 1: the objectives behind one interface (densessl/methods/objectives).

Every registry entry is a (config class, objective class) pair whose config reads the recipe's
``loss`` settings with the recipe's own defaults, the task builds the configured objectives in
registry order under the state-dict names of earlier runs, and the step's loss is the sum of the
objectives' weighted terms.
"""

from __future__ import annotations

import pytest
import torch
from helpers import identity_pair_batch

from densessl.methods import DensePretraining
from densessl.methods.objectives import (
    OBJECTIVES,
    Objective,
    ObjectiveConfig,
    StepInputs,
    build_objectives,
    objective_config,
)
from densessl.recipe import LossConfig, load_recipe


def recipe(**loss):
    """The test recipe; ``loss``: its loss settings by section (``dense={...}``, ``global_``,
    ``instance``, ``robust``, ...), merged over the small queues here."""
    sections = {"dense": {"queue_size": 32}, "global_": {"queue_size": 32},
                "instance": {"queue_size": 32, "roi_canonical_scale": 64}}
    for key, value in loss.items():
        sections[key] = {**sections.get(key, {}), **value} if isinstance(value, dict) else value
    return load_recipe({
        "name": "objectives",
        "data": {"image_size": 80, "options": {"num_images": 4}},
        "augment": {"view_size": 64},
        "model": {"backbone": "resnet18", "neck": "fpn", "global_head": True,
                  "key_bn": "batch"},
        "loss": sections,
        "train": {"batch_size": 4},
    })


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_entry_is_a_config_and_an_objective(name):
    config_class, objective_class = OBJECTIVES[name]
    assert issubclass(config_class, ObjectiveConfig)
    assert issubclass(objective_class, Objective)
    assert objective_class.name == name and objective_class.config_class is config_class
    assert "weight" in config_class.model_fields


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_config_reads_its_own_loss_section(name):
    config_class, _ = OBJECTIVES[name]
    # loss.<SECTION> as a recipe writes it (global: the attribute global_, alias global)
    fields = {field.alias or key: field for key, field in LossConfig.model_fields.items()}
    assert config_class.SECTION == name
    assert isinstance(fields[name].default, config_class)
    assert config_class() == fields[name].default  # the section's defaults are the class's
    attribute = "global_" if name == "global" else name
    custom = recipe(**{attribute: {"weight": 0.25}})
    config = objective_config(custom, name)
    assert config is custom.loss.section(name) and config.weight == 0.25
    assert objective_config(recipe(), name).weight == config_class().weight


def test_objectives_follow_the_weights_in_registry_order():
    assert [o.name for o in build_objectives(recipe())] == ["dense", "global"]
    assert [o.name for o in build_objectives(recipe(instance={"weight": 0.5}))] == \
        ["dense", "global", "instance"]
    assert [o.name for o in build_objectives(recipe(dense={"weight": 0}, global_={"weight": 0},
                                                    instance={"weight": 1}))] == ["instance"]
    no_head = recipe().model_copy(deep=True)
    no_head.model.global_head = False  # the global objective needs the global head
    assert [o.name for o in build_objectives(no_head)] == ["dense"]


def test_task_registers_modules_under_the_old_names():
    torch.manual_seed(0)
    task = DensePretraining(recipe(instance={"weight": 0.5}))
    assert [o.name for o in task.objectives] == ["dense", "global", "instance"]
    for objective in task.objectives:
        assert getattr(task, f"{objective.name}_loss") is objective.module
    keys = set(task.state_dict())
    for prefix in ("dense_loss.queue.keys", "global_loss.queue.keys",
                   "instance_loss.queue.keys", "model.online.instance_head."):
        assert any(k.startswith(prefix) for k in keys), prefix
    dense_only = DensePretraining(recipe(global_={"weight": 0}))
    assert dense_only.global_loss is None and dense_only.instance_loss is None


class _Fixed(Objective):
    name = "fixed"

    def __call__(self, inputs: StepInputs):
        from densessl.methods.objectives import ObjectiveOutput

        value = inputs.batch.view_a.new_tensor(2.0)
        return ObjectiveOutput(self.weight * value, {"loss_fixed": value})


def test_step_sums_the_weighted_terms_and_logs():
    torch.manual_seed(0)
    task = DensePretraining(recipe(global_={"weight": 0}, dense={"weight": 0.5}))
    task.objectives.append(_Fixed(ObjectiveConfig(weight=0.25), task.recipe))
    total, logs = task.compute_losses(identity_pair_batch(torch.zeros(4, 8, 8, dtype=torch.long)))
    assert logs["loss_fixed"] == 2.0
    assert torch.allclose(total, 0.5 * logs["loss_dense"] + 0.25 * 2.0, atol=1e-6)
    assert torch.equal(logs["loss"], total.detach())
    assert {"loss_dense", "dense_pairs", "dense_query_cells_per_image", "feature_std",
            "valid_fraction"} <= set(logs)
