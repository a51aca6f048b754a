"""timm CNNs as backbones (``model.backbone: timm:<name>``): levels and strides against timm's own
``feature_info``, one pretraining step, split BN of timm's BatchNormAct2d against a per-group
reference, export round trips into timm and smp compared numerically, and fine-tuning models
that start from the pretrained encoder. Tiny timm models, 64 px inputs."""

from __future__ import annotations

import json

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import pair_batch

from densessl.build import build_encoder
from densessl.errors import DensesslError, RecipeError
from densessl.eval.detection import build_detector
from densessl.eval.linear_probe import LinearProbe
from densessl.eval.segmentation import build_segmentation_model
from densessl.io import save_torch, write_json
from densessl.methods import DensePretraining
from densessl.models import DenseEncoder
from densessl.models.split_batchnorm import convert_to_split_batchnorm
from densessl.models.timm_backbone import TimmBackbone, level_indices
from densessl.models.weights import load_encoder_file
from densessl.recipe import load_recipe
from densessl.workflows.export import export_weights

# LayerNorm (ConvNeXt), BatchNormAct2d + plain BN (MobileNetV3), BatchNormAct2d (RegNet)
MODELS = ["convnext_atto", "mobilenetv3_small_050", "regnetx_002"]
STRIDES = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}
C = 5  # not 3: the stem is rebuilt for it


def _x(channels=C, size=64, batch=2):
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(1))


def _randomise_bn_stats(module):
    """Non-trivial running statistics, so eval-mode features depend on every buffer."""
    gen = torch.Generator().manual_seed(3)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


def _recipe(backbone, **model):
    return load_recipe({
        "name": "timm-test",
        "data": {"image_size": 80, "channels": C, "options": {"num_images": 4}},
        "augment": {"view_size": 64, "mean": 0.5, "std": 0.25},
        "model": {"backbone": backbone, "neck_dim": 32, "dense_dim": 32, "global_dim": 32,
                  **model},
        "loss": {"dense": {"queue_size": 64}, "global": {"queue_size": 32}},
        "train": {"batch_size": 4},
    })


def test_recipe_takes_timm_names_and_refuses_others():
    # the backbone registry judges the name when the recipe is validated (every command and
    # pretrain() / run() / finetune() do it before reading data)
    from densessl.workflows.validation import validate_recipe

    recipe = _recipe("timm:convnext_atto")
    validate_recipe(recipe, finetuning=False)
    assert recipe.model.backbone == "timm:convnext_atto"
    with pytest.raises(RecipeError, match=r"model\.backbone.*did you mean timm:convnext_atto"):
        validate_recipe(_recipe("timm:convnext_attto"), finetuning=False)
    with pytest.raises(RecipeError, match=r"model\.backbone.*resnet18, resnet34, resnet50 or "
                                          r"timm:"):
        validate_recipe(_recipe("convnext_atto"), finetuning=False)


@pytest.mark.parametrize("name", MODELS)
def test_levels_follow_timm_feature_info(name):
    """c2..c5 are timm's outputs at strides 4..32 (by timm's own feature_info and features
    model, built independently), and the pyramid has the strides the FPN and RoIAlign assume."""
    torch.manual_seed(0)
    ours = TimmBackbone(name, C).eval()
    ref = timm.create_model(name, features_only=True, pretrained=False, in_chans=C).eval()
    reductions, channels = ref.feature_info.reduction(), ref.feature_info.channels()
    assert ref.load_state_dict(ours.state_dict()) is not None  # encoder.pt is timm's layout
    _randomise_bn_stats(ours)
    ref.load_state_dict(ours.state_dict())
    with torch.no_grad():
        got, want = ours(_x()), ref(_x())
    for level, stride in STRIDES.items():
        i = max(j for j, r in enumerate(reductions) if r == stride)
        assert ours.channels[level] == channels[i]
        assert got[level].shape == (2, channels[i], 64 // stride, 64 // stride)
        torch.testing.assert_close(got[level], want[i])
    enc = DenseEncoder(f"timm:{name}", C, neck_dim=32, dense_dim=16, pyramid="all").eval()
    with torch.no_grad():
        out = enc(_x())
    assert {k: v.shape[-1] for k, v in out["pyramid"].items()} == {
        "p2": 16, "p3": 8, "p4": 4, "p5": 2}
    assert out["dense"].shape == (2, 16, 8, 8) and out["global"].shape == (2, 128)


def test_models_without_the_strides_are_a_recipe_error():
    with pytest.raises(ValueError, match=r"timm:vit_x has feature strides \[16, 16, 16\].*"
                                         r"stride 4 is missing"):
        level_indices("vit_x", [16, 16, 16])
    with pytest.raises(RecipeError, match=r"model\.backbone: timm:vit_tiny_patch16_224.*stride"):
        build_encoder(_recipe("timm:vit_tiny_patch16_224"))
    with pytest.raises(ValueError, match="multiples of 32"):
        TimmBackbone("convnext_atto", C)(_x(size=48))


@pytest.mark.parametrize("name,key_bn,instance", [("mobilenetv3_small_050", "split", False),
                                                  ("convnext_atto", "shuffle", True)])
def test_one_pretraining_step(name, key_bn, instance):
    torch.manual_seed(0)
    loss_cfg = {"instance": {"weight": 1.0, "queue_size": 32}} if instance else {}
    recipe = _recipe(f"timm:{name}", key_bn=key_bn, split_bn_groups=2)
    if instance:
        recipe = load_recipe(recipe, [f"loss.{k}={v}" for k, v in loss_cfg.items()])
    task = DensePretraining(recipe)
    online, key = task.model.online.backbone, task.model.momentum.backbone
    # the key encoder is a separate copy; with split, its BN (and BN+act) layers are split
    assert all(p is not q for p, q in zip(online.parameters(), key.parameters()))
    if key_bn == "split":
        kinds = {type(m).__name__ for m in key.modules()}
        assert {"SplitBatchNorm2d", "SplitBatchNormAct2d"} <= kinds
        assert "BatchNormAct2d" not in kinds
    batch = pair_batch(recipe, torch.device("cpu"), with_instances=instance)
    loss, logs = task.compute_losses(batch)
    assert torch.isfinite(loss)
    if instance:
        assert "loss_instance" in logs and torch.isfinite(logs["loss_instance"])
    loss.backward()
    stem = next(p for p in online.parameters())  # the first conv, the farthest from the loss
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    assert all(p.grad is None for p in key.parameters())


def test_split_bn_act_is_per_group_bn_then_its_activation():
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    model = nn.Sequential(BatchNormAct2d(3, act_layer=nn.ReLU))
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.5)
        model[0].bias.uniform_(-0.5, 0.5)
    weight, bias = model[0].weight.detach().double(), model[0].bias.detach().double()
    keys = set(model.state_dict())
    convert_to_split_batchnorm(model, 2)
    assert type(model[0]).__name__ == "SplitBatchNormAct2d" and set(model.state_dict()) == keys
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    out = model.train()(x)
    # float64 reference: each half of the batch normalised by its own statistics, then ReLU
    ref = []
    for part in x.double().chunk(2):
        mean = part.mean((0, 2, 3), keepdim=True)
        var = part.var((0, 2, 3), unbiased=False, keepdim=True)
        ref.append(F.relu((part - mean) / torch.sqrt(var + 1e-5) * weight[:, None, None]
                          + bias[:, None, None]))
    torch.testing.assert_close(out.double(), torch.cat(ref), atol=1e-5, rtol=1e-5)


@pytest.fixture(params=MODELS)
def timm_weights(request, tmp_path):
    """encoder.pt / neck.pt / encoder.json as pretraining writes them for a timm backbone."""
    name = request.param
    torch.manual_seed(0)
    enc = DenseEncoder(f"timm:{name}", 4, neck_dim=32, fpn_upsample="nearest")
    _randomise_bn_stats(enc)
    save_torch(tmp_path / "encoder.pt", enc.backbone.state_dict())
    save_torch(tmp_path / "neck.pt", enc.neck.state_dict())
    write_json(tmp_path / "encoder.json", {"backbone": f"timm:{name}", "in_channels": 4,
                                           "recipe": "t", "data_source": "synthetic",
                                           "fpn_upsample": "nearest"})
    return name, tmp_path / "encoder.pt", enc.eval()


def test_timm_export_round_trip(timm_weights, tmp_path):
    """Into the full timm model (not the features wrapper): its own intermediates equal ours."""
    name, path, enc = timm_weights
    out = export_weights(path, "timm", tmp_path / "t.pt")
    full = timm.create_model(name, pretrained=False, num_classes=0, in_chans=4).eval()
    result = full.load_state_dict(torch.load(out), strict=False)
    card = json.loads((tmp_path / "t.pt.card.json").read_text())
    assert not result.unexpected_keys
    assert sorted(result.missing_keys) == card["missing_keys"]
    # only the head after the last feature stage may be missing
    assert all(k.split(".")[0] in ("head", "conv_head", "bn2", "final_conv")
               for k in result.missing_keys)
    reductions = timm.create_model(name, features_only=True).feature_info.reduction()
    with torch.no_grad():
        inter = full.forward_intermediates(_x(4), indices=len(reductions),
                                           intermediates_only=True)
        ours = enc.backbone(_x(4))
    for level, stride in STRIDES.items():
        i = max(j for j, r in enumerate(reductions) if r == stride)
        torch.testing.assert_close(inter[i], ours[level])
    assert f"timm.create_model('{name}'" in card["load"]


def test_smp_export_round_trip(timm_weights, tmp_path):
    """Into smp's tu- encoder, strictly: its stride 4..32 features equal ours."""
    name, path, enc = timm_weights
    out = export_weights(path, "smp", tmp_path / "s.pt")
    model = smp.Unet(f"tu-{name}", encoder_weights=None, in_channels=4, classes=2).eval()
    result = model.encoder.load_state_dict(torch.load(out))
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        feats, ours = model.encoder(_x(4)), enc.backbone(_x(4))
    for i, level in enumerate(STRIDES, start=2):  # smp: [input, stride 2, c2..c5]
        torch.testing.assert_close(feats[i], ours[level])


def test_torchvision_and_detectron2_exports_are_refused(timm_weights, tmp_path):
    name, path, _ = timm_weights
    for to in ("torchvision", "detectron2"):
        with pytest.raises(DensesslError, match=rf"--to {to}: model.backbone timm:{name} has no "
                                                rf"{to} counterpart.*--to timm or --to smp"):
            export_weights(path, to, tmp_path / f"x.{to}")
    with pytest.raises(DensesslError, match="no FPN"):
        export_weights(path, "timm", tmp_path / "n.pt", neck=True)


@pytest.mark.parametrize("timm_weights", ["convnext_atto", "mobilenetv3_small_050"],
                         indirect=True)
def test_finetuning_models_start_from_the_timm_encoder(timm_weights):
    name, path, enc = timm_weights
    init = load_encoder_file(path, f"timm:{name}", 4)
    with pytest.raises(DensesslError, match="not a timm:regnetx_004 encoder"):
        load_encoder_file(path, "timm:regnetx_004", 4)
    x = _x(4)
    with torch.no_grad():
        ours = enc.backbone(x)
    seg = build_segmentation_model("unet", f"timm:{name}", 4, 3, init.encoder).eval()
    with torch.no_grad():
        assert seg(x).shape == (2, 3, 64, 64)
        torch.testing.assert_close(seg.encoder(x)[3], ours["c3"])
    probe = LinearProbe(f"timm:{name}", 4, 3, init.encoder).eval()
    with torch.no_grad():
        torch.testing.assert_close(probe.encoder(x)["c5"], ours["c5"])
    det = build_detector("faster_rcnn", f"timm:{name}", 4, 2, 64, [0.5] * 4, [0.25] * 4,
                         fpn_dim=32, encoder_state=init.encoder, neck_state=init.neck,
                         fpn_upsample="nearest")
    assert det.loaded_groups == ["backbone", "fpn"]
    det.eval()
    with torch.no_grad():
        pyramid = det.backbone(x)
        torch.testing.assert_close(pyramid["1"], enc.neck(ours)["p3"])
    det.train()
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}
               for _ in range(2)]
    losses = det(list(x), targets)
    assert all(torch.isfinite(v) for v in losses.values())
