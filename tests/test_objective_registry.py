"""Issue #28 item 1: the objectives behind one interface (densessl/methods/objectives).

Every registry entry is a (config class, objective class) pair whose config reads the recipe's
``loss`` settings with the recipe's own defaults, the task builds the configured objectives in
registry order under the state-dict names of earlier runs, and the step's loss is the sum of the
objectives' weighted terms.
"""

from __future__ import annotations

import pytest
import torch

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
    return load_recipe({
        "name": "objectives",
        "data": {"image_size": 80, "options": {"num_images": 4}},
        "augment": {"view_size": 64},
        "model": {"backbone": "resnet18", "neck": "fpn", "global_head": True,
                  "key_bn": "batch"},
        "loss": {"dense_queue_size": 32, "global_queue_size": 32, "instance_queue_size": 32,
                 "roi_canonical_scale": 64, **loss},
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
def test_config_reads_the_loss_section_with_its_defaults(name):
    config_class, _ = OBJECTIVES[name]
    loss_fields = LossConfig.model_fields
    if config_class.SECTION is not None:  # its own section, loss.<SECTION>
        assert isinstance(loss_fields[config_class.SECTION].default, config_class)
        assert objective_config(recipe(), name) == config_class()
        return
    assert set(config_class.FLAT) == set(config_class.model_fields)
    for field, key in config_class.FLAT.items():
        assert key in loss_fields, f"{name}.{field} reads loss.{key}, which does not exist"
        # the config class's own default is the recipe's (a config built on its own agrees)
        assert config_class.model_fields[field].default == loss_fields[key].default, \
            f"{name}.{field}"
    custom = recipe(temperature=0.1, robust="rank", rank_threshold=0.3)
    config = objective_config(custom, name)
    for field, key in config_class.FLAT.items():
        assert getattr(config, field) == getattr(custom.loss, key)


def test_objectives_follow_the_weights_in_registry_order():
    assert [o.name for o in build_objectives(recipe())] == ["dense", "global"]
    assert [o.name for o in build_objectives(recipe(instance_weight=0.5))] == \
        ["dense", "global", "instance"]
    assert [o.name for o in build_objectives(recipe(dense_weight=0, global_weight=0,
                                                    instance_weight=1))] == ["instance"]
    no_head = recipe().model_copy(deep=True)
    no_head.model.global_head = False  # the global objective needs the global head
    assert [o.name for o in build_objectives(no_head)] == ["dense"]


def test_task_registers_modules_under_the_old_names():
    torch.manual_seed(0)
    task = DensePretraining(recipe(instance_weight=0.5))
    assert [o.name for o in task.objectives] == ["dense", "global", "instance"]
    for objective in task.objectives:
        assert getattr(task, f"{objective.name}_loss") is objective.module
    keys = set(task.state_dict())
    for prefix in ("dense_loss.queue.keys", "global_loss.queue.keys",
                   "instance_loss.queue.keys", "model.online.instance_head."):
        assert any(k.startswith(prefix) for k in keys), prefix
    dense_only = DensePretraining(recipe(global_weight=0))
    assert dense_only.global_loss is None and dense_only.instance_loss is None


class _Fixed(Objective):
    name = "fixed"

    def __call__(self, inputs: StepInputs):
        from densessl.methods.objectives import ObjectiveOutput

        value = inputs.batch.view_a.new_tensor(2.0)
        return ObjectiveOutput(self.weight * value, {"loss_fixed": value})


def test_step_sums_the_weighted_terms_and_logs():
    from test_objective_monitors import pair_batch

    torch.manual_seed(0)
    task = DensePretraining(recipe(global_weight=0, dense_weight=0.5))
    task.objectives.append(_Fixed(ObjectiveConfig(weight=0.25), task.recipe))
    total, logs = task.compute_losses(pair_batch(torch.zeros(4, 8, 8, dtype=torch.long)))
    assert logs["loss_fixed"] == 2.0
    assert torch.allclose(total, 0.5 * logs["loss_dense"] + 0.25 * 2.0, atol=1e-6)
    assert torch.equal(logs["loss"], total.detach())
    assert {"loss_dense", "dense_pairs", "dense_query_cells_per_image", "feature_std",
            "valid_fraction"} <= set(logs)
