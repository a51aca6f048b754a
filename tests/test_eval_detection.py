"""Detection fine-tuning: torchvision R-CNNs on a ResNet-FPN from encoder.pt, COCO metrics."""

from __future__ import annotations

import pytest
import torch

from densessl.eval.detection import build_detector, build_fpn_backbone
from densessl.eval.finetune import evaluate_detector, train_detector
from densessl.eval.labeled_data import build_eval_dataset
from densessl.eval.metrics import DetectionMetrics
from densessl.models import DenseEncoder


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core CPU, OpenMP spin-waits make 2 threads far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("in_channels", [3, 2])
def test_backbone_and_neck_load_exactly_and_match_our_encoder(in_channels):
    torch.manual_seed(0)
    ours = DenseEncoder("resnet18", in_channels, neck="fpn", neck_dim=32).eval()
    body = build_fpn_backbone("resnet18", in_channels, 32, ours.backbone.state_dict(),
                              ours.neck.state_dict()).eval()
    assert set(body.body.state_dict()) == set(ours.backbone.state_dict())
    x = torch.rand(1, in_channels, 64, 64)
    with torch.no_grad():
        mine, theirs = ours(x)["pyramid"], body(x)
    for level, name in zip(("p2", "p3", "p4", "p5"), ("0", "1", "2", "3")):
        assert torch.allclose(mine[level], theirs[name], atol=1e-5), level
    assert theirs["pool"].shape[-1] == 1  # p6 by max-pooling p5, as torchvision does


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
    first = {k: v.item() for k, v in model([sample["image"]], [target]).items()}
    assert ("loss_mask" in first) == masks
    train_detector(model, data.train, steps=2, batch_size=2, lr=1e-3, weight_decay=0, seed=0,
                   masks=masks)
    out = evaluate_detector(model, data.val, batch_size=2, masks=masks)
    assert {"box_mAP", "box_AP50", "box_AP75", "box_AR100"} <= set(out)
    assert ("mask_mAP" in out) == masks
