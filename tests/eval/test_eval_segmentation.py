"""Segmentation fine-tuning: smp encoders load encoder.pt exactly, metrics, labeled data."""

from __future__ import annotations

import pytest
import torch

from densessl.data.labeled import instances_from_mask
from densessl.data.labeled.build import build_eval_dataset
from densessl.errors import DensesslError, RecipeError
from densessl.eval.finetune import check_data, evaluate_dense, label_subset, train_dense
from densessl.eval.linear_probe import LinearProbe
from densessl.eval.metrics import SegmentationMetrics
from densessl.eval.segmentation import build_segmentation_model
from densessl.io import save_torch
from densessl.models import ResNetBackbone
from densessl.models.weights import check_encoder_state, load_encoder_file
from densessl.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def encoder_state(backbone="resnet18", in_channels=3, seed=0):
    torch.manual_seed(seed)
    return ResNetBackbone(backbone, in_channels).state_dict()


@pytest.mark.parametrize("arch", ["unet", "fpn", "deeplabv3plus"])
@pytest.mark.parametrize("in_channels", [3, 4])
def test_smp_encoder_loads_every_key(arch, in_channels):
    state = encoder_state(in_channels=in_channels)
    model = build_segmentation_model(arch, "resnet18", in_channels, 5, state)
    own = model.encoder.state_dict()
    assert set(own) == set(state)  # zero missing, zero unexpected
    for key, value in state.items():
        assert torch.equal(own[key], value), key
    assert model(torch.rand(2, in_channels, 64, 64)).shape == (2, 5, 64, 64)


def test_smp_encoder_features_equal_ours():
    state = encoder_state()
    ours = ResNetBackbone("resnet18")
    ours.load_state_dict(state)
    model = build_segmentation_model("unet", "resnet18", 3, 5, state)
    ours.eval(), model.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.encoder(x)[-1], ours(x)["c5"], atol=1e-5)


def test_mismatched_weights_are_named(tmp_path):
    with pytest.raises(DensesslError, match="4 input channels.*data.channels=3"):
        check_encoder_state(encoder_state(in_channels=4), "resnet18", 3, "w")
    with pytest.raises(DensesslError, match="look like resnet50"):
        check_encoder_state(encoder_state("resnet50"), "resnet18", 3, "w")
    path = save_torch(tmp_path / "encoder.pt", encoder_state("resnet34"))
    with pytest.raises(DensesslError, match="resnet18 encoder.*resnet34"):
        load_encoder_file(path, "resnet18", 3)
    with pytest.raises(DensesslError, match="not found"):
        load_encoder_file(tmp_path / "nope.pt", "resnet18", 3)


def test_instances_from_mask_components():
    mask = torch.zeros(10, 12, dtype=torch.long)
    mask[1:4, 2:6] = 2  # one component of class 2
    mask[6:9, 0:3] = 2  # a second, separate one
    mask[5:7, 8:11] = 1
    mask[0, 11] = 3  # a 1-pixel sliver: dropped
    out = instances_from_mask(mask)
    boxes = {tuple(b.tolist()): int(c) for b, c in zip(out["boxes"], out["labels"])}
    assert boxes == {(2.0, 1.0, 6.0, 4.0): 2, (0.0, 6.0, 3.0, 9.0): 2, (8.0, 5.0, 11.0, 7.0): 1}
    assert out["instance_masks"].shape == (3, 10, 12)
    assert out["instance_masks"].sum().item() == 12 + 9 + 6


def test_synthetic_labeled_splits_are_disjoint_and_keyed():
    data = build_eval_dataset("synthetic", {"num_train": 4, "num_val": 3, "num_source": 2},
                              image_size=32)
    assert (len(data.train), len(data.val), len(data.source)) == (4, 3, 2)
    assert data.num_classes == 5
    s = data.val[0]
    assert s["image"].shape == (3, 32, 32) and s["image"].dtype == torch.float32
    assert s["mask"].dtype == torch.long and s["labels"].min() >= 1
    assert not torch.equal(data.train[0]["image"], data.val[0]["image"])
    with pytest.raises(RecipeError, match="finetune.options.bogus"):
        build_eval_dataset("synthetic", {"bogus": 1})
    with pytest.raises(RecipeError, match="unknown labeled dataset 'nope'"):
        build_eval_dataset("nope", {})


def test_segmentation_metrics_against_hand_count():
    m = SegmentationMetrics(["bg", "a", "b"])
    pred = torch.tensor([[0, 1, 1, 0]])
    target = torch.tensor([[0, 1, 255, 1]])
    m.update(pred, target)
    out = m.compute()
    assert out["IoU_bg"] == pytest.approx(1 / 2) and out["IoU_a"] == pytest.approx(1 / 2)
    assert out["IoU_b"] != out["IoU_b"]  # absent everywhere: NaN, not counted
    assert out["mIoU"] == pytest.approx(0.5)


def test_training_improves_over_untrained_and_probe_stays_frozen():
    data = build_eval_dataset("synthetic", {"num_train": 16, "num_val": 8, "num_source": 0},
                              image_size=32)
    norm = {"mean": [0.5] * 3, "std": [0.25] * 3}
    torch.manual_seed(0)
    model = build_segmentation_model("fpn", "resnet18", 3, 5)
    before = evaluate_dense(model, data.val, data, batch_size=8, **norm)["mIoU"]
    train_dense(model, data.train, steps=15, batch_size=8, lr=3e-3, weight_decay=0, seed=0,
                **norm)
    after = evaluate_dense(model, data.val, data, batch_size=8, **norm)["mIoU"]
    assert after > before
    probe = LinearProbe("resnet18", 3, 5, encoder_state())
    frozen = {k: v.clone() for k, v in probe.encoder.state_dict().items()}
    train_dense(probe, data.train, steps=3, batch_size=8, lr=1e-2, weight_decay=0, seed=0,
                **norm)
    assert all(torch.equal(frozen[k], v) for k, v in probe.encoder.state_dict().items())


def test_label_subset_is_seeded_fraction():
    ds = list(range(100))
    a, b = label_subset(ds, 0.1, 0), label_subset(ds, 0.1, 0)
    assert len(a) == 10 and list(a) == list(b)
    assert list(label_subset(ds, 0.1, 1)) != list(a)
    assert len(label_subset(ds, 0.001, 0)) == 2  # BatchNorm needs two samples per batch


def test_bad_data_for_recipe_is_named():
    recipe = load_recipe({"finetune": {"tasks": ["detection"]}})
    data = build_eval_dataset("synthetic", {"num_train": 2, "num_val": 0, "num_source": 0},
                              image_size=32)
    with pytest.raises(DensesslError, match="'val' split is empty"):
        check_data(recipe, data)
    data.val = data.train
    data.keys = {"image", "mask"}
    with pytest.raises(RecipeError, match="detection needs.*boxes"):
        check_data(recipe, data)
    with pytest.raises(RecipeError, match="label_fractions"):
        load_recipe({"finetune": {"label_fractions": [0.0]}})
