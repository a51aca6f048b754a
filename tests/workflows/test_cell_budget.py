"""``densessl inspect-pairs --cells`` (issue #26): the query-cell budget's last stage is what
the dense loss itself counts on the same draws, and the stages only ever lose cells."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from densessl.build import backbone_cell_alignment, build_augmentation, build_pair_builder
from densessl.losses import DenseContrast
from densessl.pairs import collate_pairs
from densessl.recipe import load_recipe
from densessl.workflows.cell_budget import STAGES, budget_of, cell_budget
from densessl.workflows.data_settings import resolve_data_settings

RECIPES = Path(__file__).parents[2] / "recipes"


@pytest.mark.parametrize("background", ["ignore", "negative"])
def test_last_stage_is_what_the_loss_counts(tmp_path, background):
    recipe = load_recipe(RECIPES / "xray_segloc.yaml",
                         [f"pairs.options.cache_dir={tmp_path}", "pairs.options.synthetic_n=16",
                          f"loss.dense.background={background}", "loss.dense.samples_per_image=12",
                          "pairs.options.device_composite=false"])
    builder = build_pair_builder(recipe)
    resolve_data_settings(recipe, builder)
    augment = build_augmentation(recipe, grid_stride=recipe.model.dense_stride,
                                 cell_alignment=backbone_cell_alignment(recipe))
    sources = collate_pairs([builder[i] for i in range(8)])
    torch.manual_seed(5)
    budget = budget_of(sources, augment, background, samples_per_image=12)
    torch.manual_seed(5)  # the same view geometry, drawn through the training path
    pairs = augment(sources)
    loss = DenseContrast(dim=4, queue_size=8, samples_per_image=12, num_classes=13,
                         background=background, stride=recipe.model.dense_stride)
    b, _, h, w = pairs.valid_ab.shape[0], None, *pairs.valid_ab.shape[1:]
    _, stats = loss(torch.randn(b, 4, h, w), torch.randn(b, 4, h, w), pairs.grid_ab,
                    pairs.valid_ab, class_map=pairs.class_map_a, update_queue=False)
    assert budget["drawn"] == pytest.approx(float(stats["pairs"]) / b)
    values = [budget[s] for s in STAGES]
    assert values[0] == h * w
    assert all(a >= b for a, b in zip(values, values[1:])), values
    if background == "negative":  # nothing is left out for being bag
        assert budget["take part"] == budget["on source A"]
    else:
        assert budget["take part"] < budget["on source A"]


def test_same_image_without_geometry_keeps_every_cell():
    # identity correspondence, whole-image crops, no flips: every rule passes every cell
    overrides = ["data.image_size=64", "augment.view_size=64", "data.options.num_images=4",
                 "augment.geometry.crop_scale=[1.0,1.0]", "augment.geometry.hflip=0.0",
                 "augment.geometry.rotation_p=0.0"]
    budget = cell_budget(RECIPES / "same_image.yaml", overrides, count=4)
    assert all(budget[s] == 64 for s in STAGES[:-1]), budget
