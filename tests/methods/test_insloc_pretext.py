"""InsLoc's localisation pretext (issue 12, item 3): every box pooled on every FPN level with one
loss and one queue per level, jittered query boxes, and the 4conv-1fc box head with BatchNorm."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import pair_batch
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.ops import box_iou, roi_align

from densessl.augment.box_jitter import jitter_boxes
from densessl.bench.training import bench_recipe
from densessl.errors import RecipeError
from densessl.losses import LevelwiseInstanceContrast
from densessl.methods import DensePretraining
from densessl.models.instance_head import InstanceHead
from densessl.recipe import LossConfig, load_recipe, parse_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
LEVELS = ["p3", "p4", "p5"]


def float64_info_nce(q, k, negatives):
    """Loop InfoNCE in float64 on L2-normalised rows: negatives[i] lists query i's negatives."""
    losses = []
    for i in range(len(q)):
        logits = [float(q[i] @ k[i])] + [float(q[i] @ n) for n in negatives[i]]
        logits = np.asarray(logits) / 0.3
        top = logits.max()
        losses.append(top + math.log(np.exp(logits - top).sum()) - logits[0])
    return sum(losses) / len(losses)


def unit64(x):
    x = x.double().numpy()
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------- per-level loss and queues


@pytest.mark.parametrize("queue", ["single", "per_class"])
def test_all_level_loss_equals_per_level_reference(queue):
    torch.manual_seed(0)
    loss_fn = LevelwiseInstanceContrast(LEVELS, dim=4, queue_size=6, temperature=0.3,
                                        queue=queue, num_classes=3).train()
    labels = torch.tensor([0, 1, 1, 2, 0])
    first_k = torch.randn(3, 5, 4)
    loss_fn(torch.randn(3, 5, 4), first_k, labels)  # fills each level's queue with its keys
    q, k = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    loss, stats = loss_fn(q, k, labels, update_queue=False)

    per_level = []
    for level in range(3):
        qn, kn, queued = unit64(q[level]), unit64(k[level]), unit64(first_k[level])
        negatives = []
        for i, lab in enumerate(labels.tolist()):
            def allowed(other, lab=lab):
                return queue == "single" or other != lab
            negs = [queued[j] for j in range(5) if allowed(int(labels[j]))]
            negs += [kn[j] for j in range(5) if j != i and allowed(int(labels[j]))]
            negatives.append(negs)
        per_level.append(float64_info_nce(qn, kn, negatives))
    assert loss.item() == pytest.approx(sum(per_level) / 3, rel=1e-5)
    for name, expected in zip(LEVELS, per_level):
        assert stats[f"loss_{name}"].item() == pytest.approx(expected, rel=1e-5)
    assert stats["boxes"] == 5


def test_each_level_queue_holds_that_levels_keys():
    torch.manual_seed(0)
    loss_fn = LevelwiseInstanceContrast(LEVELS, dim=4, queue_size=8, temperature=0.3).train()
    k = torch.randn(3, 5, 4)
    loss_fn(torch.randn(3, 5, 4), k)
    for level, name in enumerate(LEVELS):
        queued, _ = loss_fn.level[name].queue.get()
        assert queued.shape == (5, 4)
        # each key of this level, normalised, is in this level's queue and in no other's
        expected = F.normalize(k[level], dim=1)
        torch.testing.assert_close(queued[torch.argsort(queued[:, 0])],
                                   expected[torch.argsort(expected[:, 0])])
        for other in range(3):
            if other != level:
                assert not torch.isclose(queued[:, None], F.normalize(k[other], dim=1)[None]
                                         ).all(-1).any()
    loss_fn.eval()
    loss_fn(torch.randn(3, 2, 4), torch.randn(3, 2, 4))  # eval: nothing enqueued
    assert int(loss_fn.level["p3"].queue.filled) == 5


def test_all_level_pooling_equals_roi_align_per_level():
    """Row l of the pooled features is the box (its level-l version) RoIAligned on level l,
    written from the cell convention directly (cell i of stride s centred on pixel s·i)."""
    torch.manual_seed(0)
    pyramid = {f"p{k}": torch.randn(2, 6, 128 // 2**k, 128 // 2**k) for k in (3, 4, 5)}
    boxes = torch.tensor([[[4, 4, 44, 42], [10, 20, 60, 70.0]],
                          [[0, 0, 128, 128], [30, 40, 70, 90.0]],
                          [[2, 3, 100, 90], [33, 37, 99, 101.0]]])
    batch = torch.tensor([1, 0])
    head = InstanceHead(6, out_dim=4, output_size=3, levels="all")
    pooled = head.pool(pyramid, boxes, batch)
    assert pooled.shape == (3, 2, 6, 3, 3)
    same = head.pool(pyramid, boxes[0], batch)  # one N×4 set: the same boxes on every level
    for level, k in enumerate((3, 4, 5)):
        for i in range(2):
            torch.testing.assert_close(pooled[level, i], direct(pyramid, k, boxes[level, i],
                                                                batch[i]))
            torch.testing.assert_close(same[level, i], direct(pyramid, k, boxes[0, i], batch[i]))


def direct(pyramid, k, box, image):
    s = 2**k
    rois = torch.cat([torch.tensor([float(image)]), box - 0.5])[None]
    return roi_align(pyramid[f"p{k}"], rois, 3, 1 / s, 2, aligned=False)[0]


# ---------------------------------------------------------------- jitter


def random_boxes(n, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    wh = torch.rand(n, 2, generator=g) * torch.tensor([width, height]) * 0.5 + 4
    xy = torch.rand(n, 2, generator=g) * (torch.tensor([width, height]) - wh)
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[:10] = torch.tensor([0.0, 0.0, 12.0, 10.0])  # at the corner: jitter must stay inside
    boxes[10:20] = torch.tensor([width - 9.0, height - 14.0, width, height])
    return boxes


def test_jitter_stays_within_insloc_bounds_and_the_view():
    height, width = 48, 64
    boxes = random_boxes(4000, height, width)
    jittered = jitter_boxes(boxes, height, width, generator=torch.Generator().manual_seed(1))
    iou = box_iou(boxes.double(), jittered.double()).diagonal()
    changed = (jittered != boxes).any(1)
    assert changed.float().mean() > 0.99  # a box keeps its own with probability ~0.1 %
    assert (iou[changed] > 0.5).all()  # InsLoc: IoU > 0.5 (anchor_aug.py iou_thr)
    assert (jittered[:, :2] >= 0).all() and (jittered[:, 2] <= width).all()
    assert (jittered[:, 3] <= height).all()
    assert (jittered[:, 2:] > jittered[:, :2]).all()
    # the magnitude is InsLoc's, not a token shake: the draws reach the bound
    assert iou.min() < 0.55 and iou.median() < 0.8
    side = (jittered[:, 2:] - jittered[:, :2]) / (boxes[:, 2:] - boxes[:, :2])
    assert side.min() < 0.65 and side.max() > 1.6
    assert changed[:20].all()  # border boxes move too (inward)


def test_jitter_min_iou_and_degenerate_boxes():
    boxes = random_boxes(500, 48, 64)
    tight = jitter_boxes(boxes, 48, 64, min_iou=0.8, generator=torch.Generator().manual_seed(2))
    assert (box_iou(boxes.double(), tight.double()).diagonal() > 0.8 - 1e-6).all()
    empty = torch.tensor([[5.0, 5.0, 5.0, 9.0]])
    assert torch.equal(jitter_boxes(empty, 48, 64), empty)  # nothing passes: unchanged
    assert jitter_boxes(torch.zeros(0, 4), 48, 64).shape == (0, 4)
    with pytest.raises(ValueError, match="min_iou"):
        jitter_boxes(boxes, 48, 64, min_iou=1.0)


def insloc_overrides(**instance):
    """InsLoc's pretext as bench_recipe's loss settings (``instance``: more of loss.instance)."""
    return {"instance": {"weight": 1.0, "queue_size": 8, "roi_levels": "all", "box_jitter": True,
                         "roi_head": "conv", "roi_head_fc_dim": 32, **instance},
            "dense": {"queue_size": 16}}


def captured_boxes(task, batch):
    seen = {}
    heads = {"online": task.model.online.instance_head,
             "momentum": task.model.momentum.instance_head}
    for name, head in heads.items():
        original = head.pool

        def record(pyramid, boxes, box_batch, name=name, original=original):
            seen[name] = boxes.clone()
            return original(pyramid, boxes, box_batch)
        head.pool = record
    task.compute_losses(batch)
    return seen


def test_only_view_a_boxes_are_jittered_and_only_on_p5():
    torch.manual_seed(0)
    recipe = bench_recipe("resnet18", 64, 4, **insloc_overrides())
    batch = pair_batch(recipe, torch.device("cpu"), with_instances=True)
    seen = captured_boxes(DensePretraining(recipe), batch)
    query = seen["online"]
    assert query.shape == (4, len(batch.boxes_a), 4)  # p2..p5
    for level in range(3):
        torch.testing.assert_close(query[level], batch.boxes_a)
    assert (query[3] != batch.boxes_a).any(1).all()
    iou = box_iou(query[3].double(), batch.boxes_a.double()).diagonal()
    assert (iou > 0.5).all()
    torch.testing.assert_close(seen["momentum"], batch.boxes_b)  # keys: true boxes

    recipe = bench_recipe("resnet18", 64, 4, **insloc_overrides(box_jitter_levels="all"))
    query = captured_boxes(DensePretraining(recipe), batch)["online"]
    assert query.shape == batch.boxes_a.shape and (query != batch.boxes_a).any(1).all()


# ---------------------------------------------------------------- conv head


def test_conv_head_is_torchvisions_box_head_key_for_key():
    head = InstanceHead(32, out_dim=16, output_size=7, head="conv", fc_dim=64)
    assert type(head.box_head) is FastRCNNConvFCHead
    detector_head = FastRCNNConvFCHead((32, 7, 7), [32] * 4, [64],
                                       norm_layer=torch.nn.BatchNorm2d)
    detector_head.load_state_dict(head.box_head.state_dict())  # strict: same keys and shapes
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in head.box_head.modules()) == 4
    assert head.projector[-1].out_features == 16
    assert not hasattr(head, "mlp")


@pytest.mark.parametrize("boxes", [0, 1])
def test_conv_head_handles_zero_or_one_box_in_training(boxes):
    head = InstanceHead(8, out_dim=6, output_size=3, head="conv", fc_dim=16,
                        levels="all").train()
    pyramid = {f"p{k}": torch.randn(2, 8, 64 // 2**k, 64 // 2**k, requires_grad=True)
               for k in (2, 3)}
    box = torch.tensor([[4.0, 4.0, 30.0, 28.0]])[:boxes]
    out = head(pyramid, box, torch.zeros(boxes, dtype=torch.long))
    assert out.shape == (2, boxes, 6) and torch.isfinite(out).all()
    out.sum().backward()
    bn = head.box_head[0][1]
    assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()


def test_conv_head_trains_one_step():
    torch.manual_seed(0)
    recipe = bench_recipe("resnet18", 64, 4, **insloc_overrides(queue_size=32))
    batch = pair_batch(recipe, torch.device("cpu"), with_instances=True)
    task = DensePretraining(recipe)
    head = task.model.online.instance_head
    before = {k: v.clone() for k, v in head.state_dict().items()}
    optimizer = task.configure_optimizers()["optimizer"]
    loss, logs = task.compute_losses(batch)
    assert {f"instance_loss_p{k}" for k in (2, 3, 4, 5)} <= set(logs)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    after = head.state_dict()
    for key in ("box_head.0.0.weight", "box_head.3.1.weight", "box_head.5.weight",
                "projector.2.weight"):
        assert not torch.equal(before[key], after[key]), key
    assert not torch.equal(before["box_head.0.1.running_mean"],
                           after["box_head.0.1.running_mean"])
    for k in (2, 3, 4, 5):  # one queue per level, each holding this step's keys
        assert int(task.instance_loss.level[f"p{k}"].queue.filled) == len(batch.boxes_a)


# ---------------------------------------------------------------- recipes


def test_insloc_recipe_defaults_to_insloc_and_loss_config_to_the_lean_path():
    data = yaml.safe_load((RECIPES / "xray_insloc.yaml").read_text())
    loss = load_recipe(data).loss
    instance = loss.instance
    assert (instance.roi_levels, instance.box_jitter, instance.box_jitter_levels,
            instance.roi_head) == ("all", True, "coarsest", "conv")
    assert instance.box_jitter_min_iou == 0.5
    lean = LossConfig().instance
    assert (lean.roi_levels, lean.box_jitter, lean.roi_head) == ("by_size", False, "mlp")


@pytest.mark.parametrize("loss, message", [
    ({"instance": {"roi_head": "conv", "roi_output_size": 1}}, "roi_output_size >= 2"),
    ({"instance": {"box_jitter": True}},
     "box_jitter_levels: coarsest needs loss.instance.roi_levels: all"),
    ({"instance": {"roi_levels": "every"}}, "loss.instance.roi_levels"),
    ({"instance": {"box_jitter_min_iou": 1.0}}, "loss.instance.box_jitter_min_iou"),
])
def test_bad_instance_options_name_the_key(loss, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe({"loss": loss})


def test_insloc_recipe_pretrains_one_step(tmp_path, capsys):
    """End to end through the CLI: InsLoc's choices train on the synthetic X-ray set."""
    import json

    from densessl import cli

    out = tmp_path / "run"
    code = cli.main(["pretrain", str(RECIPES / "xray_insloc.yaml"), "--out", str(out),
                     "--set", "train.max_steps=1", "--set", "train.batch_size=4",
                     "--set", "model.split_bn_groups=2",
                     "--set", "train.num_workers=0", "--set", "data.image_size=64",
                     "--set", "augment.view_size=48", "--set", "loss.instance.roi_head_fc_dim=64",
                     "--set", f"pairs.options.cache_dir={tmp_path / 'cache'}"])
    assert code == 0, capsys.readouterr().err
    final = json.loads((out / "metrics.json").read_text())["final"]
    for k in (2, 3, 4, 5):
        assert math.isfinite(final[f"instance_loss_p{k}"])
    assert final["instance_boxes"] > 0
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=False)["state_dict"]
    assert "model.online.instance_head.box_head.0.1.running_mean" in state
    assert {f"instance_loss.level.p{k}.queue.keys" for k in (2, 3, 4, 5)} <= set(state)
