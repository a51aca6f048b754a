"""Detection fine-tuning: torchvision R-CNNs on a ResNet-FPN from encoder.pt, COCO metrics."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from helpers import randomise_bn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from densessl.data.labeled.build import build_eval_dataset
from densessl.eval.detection import build_detector, build_fpn_backbone
from densessl.eval.finetune import evaluate_detector, train_detector
from densessl.eval.metrics import DetectionMetrics
from densessl.models import DenseEncoder

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _centred_up(coarse, size):
    """Independent reference of the centred upsampling, by index: fine cell i sits at coarse
    position i/2, so even cells copy coarse cell i/2 and odd cells average their two coarse
    neighbours (past the last coarse cell, the edge repeats)."""
    def along(x, dim, n):
        m = x.shape[dim]
        lo = torch.tensor([min(i // 2, m - 1) for i in range(n)])
        hi = torch.tensor([min((i + 1) // 2, m - 1) for i in range(n)])
        return (x.index_select(dim, lo) + x.index_select(dim, hi)) / 2
    return along(along(coarse, -2, size[0]), -1, size[1])


def _reference_fpn(fpn, feats, upsample):
    """The FPN's top-down pass written out with its own lateral / output convolutions."""
    laterals = [fpn.inner_blocks[i](f) for i, f in enumerate(feats)]
    inner = laterals[-1]
    outs = [fpn.layer_blocks[-1](inner)]
    for i in range(len(feats) - 2, -1, -1):
        size = laterals[i].shape[-2:]
        up = (F.interpolate(inner, size=size, mode="nearest") if upsample == "nearest"
              else _centred_up(inner, size))
        inner = laterals[i] + up
        outs.insert(0, fpn.layer_blocks[i](inner))
    return outs


@pytest.mark.parametrize("in_channels,upsample", [(3, "centred"), (2, "centred"),
                                                  (3, "nearest")])
def test_backbone_and_neck_load_exactly_and_match_our_encoder(in_channels, upsample):
    torch.manual_seed(0)
    ours = randomise_bn(DenseEncoder("resnet18", in_channels, neck="fpn", neck_dim=32,
                                      fpn_upsample=upsample)).eval()
    body = build_fpn_backbone("resnet18", in_channels, 32, ours.backbone.state_dict(),
                              ours.neck.state_dict(), fpn_upsample=upsample).eval()
    assert set(body.body.state_dict()) == set(ours.backbone.state_dict())
    assert body.loaded_groups == ["backbone", "fpn"]
    x = torch.rand(1, in_channels, 80, 80)  # 80: odd-sized c4/c5 (5×5, 3×3) test the edge
    with torch.no_grad():
        mine, theirs = ours(x)["pyramid"], body(x)
        feats = list(ours.backbone(x).values())
        reference = _reference_fpn(body.fpn, feats, upsample)
    for i, (level, name) in enumerate(zip(("p2", "p3", "p4", "p5"), ("0", "1", "2", "3"))):
        assert torch.allclose(mine[level], theirs[name], atol=1e-5), level
        assert torch.allclose(reference[i], theirs[name], atol=1e-5), level
    assert theirs["pool"].shape[-1] == 2  # p6 by max-pooling p5, as torchvision does
    if upsample == "nearest":  # torchvision's own FPN is then a reference too
        tv = FeaturePyramidNetwork([64, 128, 256, 512], 32, extra_blocks=LastLevelMaxPool())
        tv.load_state_dict(body.fpn.state_dict())
        with torch.no_grad():
            tv_out = tv(OrderedDict(zip("0123", feats)))
        for name in ("0", "1", "2", "3", "pool"):
            assert torch.allclose(tv_out[name], theirs[name], atol=1e-5), name


def test_detector_fpn_with_the_other_upsampling_computes_something_else():
    """The mode matters: the same weights under the other upsampling differ on p2..p4."""
    torch.manual_seed(0)
    ours = DenseEncoder("resnet18", 3, neck="fpn", neck_dim=32, fpn_upsample="centred").eval()
    body = build_fpn_backbone("resnet18", 3, 32, ours.backbone.state_dict(),
                              ours.neck.state_dict(), fpn_upsample="nearest").eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(ours(x)["pyramid"]["p2"], body(x)["0"], atol=1e-3)


def test_neck_with_other_width_is_an_error():
    from densessl.errors import DensesslError

    ours = DenseEncoder("resnet18", 3, neck="fpn", neck_dim=32)
    with pytest.raises(DensesslError, match="neck"):
        build_fpn_backbone("resnet18", 3, 64, ours.backbone.state_dict(), ours.neck.state_dict())


def test_detection_metrics_perfect_and_wrong():
    boxes = torch.tensor([[2.0, 2.0, 20.0, 20.0], [30.0, 30.0, 50.0, 44.0]])
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 2:20, 2:20] = True
    masks[1, 30:44, 30:50] = True
    target = {"boxes": boxes, "labels": torch.tensor([1, 2]), "instance_masks": masks}
    m = DetectionMetrics(masks=True)
    m.update([{"boxes": boxes, "labels": torch.tensor([1, 2]), "scores": torch.tensor([.9, .8]),
               "masks": masks[:, None].float()}], [target])
    out = m.compute()
    for key in ("box_mAP", "box_AP50", "box_AP75", "box_AR100", "mask_mAP", "mask_AR100"):
        assert out[key] == pytest.approx(1.0), key
    wrong = DetectionMetrics()
    wrong.update([{"boxes": boxes + 25, "labels": torch.tensor([1, 2]),
                   "scores": torch.tensor([.9, .8])}], [target])
    assert wrong.compute()["box_mAP"] == pytest.approx(0.0)


@pytest.mark.parametrize("arch", ["faster_rcnn", "mask_rcnn"])
def test_detector_trains_and_is_scored(arch):
    data = build_eval_dataset("synthetic", {"num_train": 4, "num_val": 2, "num_source": 0},
                              image_size=64)
    torch.manual_seed(0)
    model = build_detector(arch, "resnet18", 3, 4, 64, [0.5] * 3, [0.25] * 3, fpn_dim=32)
    masks = arch == "mask_rcnn"
    model.train()
    sample = data.train[0]
    target = {"boxes": sample["boxes"], "labels": sample["labels"]}
    if masks:
        target["masks"] = sample["instance_masks"].to(torch.uint8)

    def fixed_batch_loss():  # the same RPN / RoI sampling draws each time
        model.train()
        torch.manual_seed(0)
        with torch.no_grad():
            return {k: v.item() for k, v in model([sample["image"]], [target]).items()}

    first = fixed_batch_loss()
    assert ("loss_mask" in first) == masks
    train_detector(model, [sample] * 2, steps=8, batch_size=2, lr=1e-3, weight_decay=0, seed=0,
                   masks=masks)
    # training fits the batch it sees: the summed loss falls well below where it started
    # (≈ 2.3 → 0.75 Faster, 4.0 → 1.3 Mask R-CNN), the classifier's (≈ ln 5 at start) most
    after = fixed_batch_loss()
    assert after.keys() == first.keys()
    assert sum(after.values()) < 0.6 * sum(first.values()), (first, after)
    assert after["loss_classifier"] < 0.3 * first["loss_classifier"]
    out = evaluate_detector(model, data.val, batch_size=2, masks=masks)
    assert {"box_mAP", "box_AP50", "box_AP75", "box_AR100"} <= set(out)
    assert ("mask_mAP" in out) == masks
