"""RoIAlign on the FPN level chosen by box size, and the instance InfoNCE with its queues."""

import math

import pytest
import torch
from torchvision.ops import roi_align

from densessl.losses import InstanceContrast
from densessl.losses.functional import info_nce
from densessl.models.instance_head import InstanceHead, assign_fpn_levels, multiscale_roi_align


def paper_level(box, k_min, k_max, canonical_scale=224.0, canonical_level=4):
    """Lin et al. 2017 eq. 1 for one box, in float64: ⌊k0 + log2(√(wh) / s0)⌋, clamped."""
    x1, y1, x2, y2 = (float(v) for v in box)
    area = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    if area == 0:
        return k_min
    level = math.floor(canonical_level + math.log2(math.sqrt(area) / canonical_scale))
    return min(k_max, max(k_min, level))


def test_levels_follow_the_fpn_paper_formula():
    # around the level boundaries (√(wh) = 112, 224, 448 at s0 = 224), an inverted box
    boxes = torch.tensor([[0, 0, 8, 8], [0, 0, 40, 30], [5, 5, 100, 120], [0, 0, 300, 260],
                          [0, 0, 900, 900.0], [0, 0, 111, 111], [0, 0, 112, 112],
                          [0, 0, 223, 224], [0, 0, 224, 224], [3, 3, 451, 451],
                          [10, 10, 4, 40]])
    expected = torch.tensor([paper_level(b, 2, 5) for b in boxes.tolist()])
    assert set(expected.tolist()) == {2, 3, 4, 5}
    torch.testing.assert_close(assign_fpn_levels(boxes, 2, 5), expected)


@pytest.mark.parametrize("sync_free", [False, True])
def test_pooled_features_equal_direct_roi_align(sync_free):
    torch.manual_seed(0)
    size = 128
    pyramid = {f"p{k}": torch.randn(2, 8, size // 2**k, size // 2**k) for k in (2, 3, 4, 5)}
    boxes = torch.tensor([[4, 4, 14, 12], [10, 20, 60, 70], [0, 0, 128, 128], [30, 40, 50, 50],
                          [2, 3, 100, 90.0]])
    batch = torch.tensor([0, 1, 1, 0, 1])
    pooled = multiscale_roi_align(pyramid, boxes, batch, output_size=5,
                                  canonical_scale=56, canonical_level=4, sync_free=sync_free)
    levels = [paper_level(b, 2, 5, canonical_scale=56) for b in boxes.tolist()]
    assert len(set(levels)) >= 3  # the test covers several levels
    for i in range(len(boxes)):
        k = levels[i]
        torch.testing.assert_close(pooled[i], direct_roi_align(pyramid[f"p{k}"], boxes[i],
                                                               int(batch[i]), 2**k, 5))


def direct_roi_align(feature, box, image, stride, output_size):
    """One box, written independently of densessl.cells: a ResNet's stride-s cell i is centred
    on pixel s·i, and a COCO edge x is pixel coordinate x − 0.5, so the edge sits at feature
    coordinate (x − 0.5)/s, which ``aligned=False`` samples as given (every box here is at
    least one cell wide, so its minimum-size clamp does not apply)."""
    assert float(box[2] - box[0]) >= stride and float(box[3] - box[1]) >= stride
    rois = torch.cat([torch.tensor([float(image)]), box - 0.5])[None]
    return roi_align(feature, rois, output_size, 1 / stride, 2, aligned=False)[0]


def test_head_shapes_and_gradients():
    head = InstanceHead(8, hidden_dim=16, out_dim=6, output_size=3)
    pyramid = {f"p{k}": torch.randn(1, 8, 64 // 2**k, 64 // 2**k, requires_grad=True)
               for k in (2, 3)}
    out = head(pyramid, torch.tensor([[0, 0, 20, 20.0]]), torch.tensor([0]))
    assert out.shape == (1, 6)
    out.sum().backward()
    assert pyramid["p2"].grad.abs().sum() > 0
    assert head(pyramid, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)).shape == (0, 6)


@pytest.mark.parametrize("queue", ["single", "per_class"])
def test_loss_equals_brute_force(queue):
    torch.manual_seed(0)
    loss_fn = InstanceContrast(dim=4, queue_size=6, temperature=0.3, queue=queue, num_classes=3)
    labels = torch.tensor([0, 1, 1, -1, 2])
    q, k = torch.randn(5, 4), torch.randn(5, 4)
    loss_fn.train()
    loss_fn(torch.randn(5, 4), torch.randn(5, 4), labels)  # something in the queue
    loss, stats = loss_fn(q, k, labels, update_queue=False)
    qn, kn = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(k, dim=1)
    queued, queued_labels = loss_fn.queue.get()
    if queued_labels is None:
        queued_labels = torch.full((len(queued),), -1)
    terms = []
    for i, lab in enumerate(labels.tolist()):
        def allowed(other, lab=lab):
            return queue == "single" or lab == -1 or other == -1 or other != lab
        negs = [queued[j] for j in range(len(queued)) if allowed(int(queued_labels[j]))]
        negs += [kn[j] for j in range(5) if j != i and allowed(int(labels[j]))]
        terms.append(info_nce(qn[i:i + 1], kn[i:i + 1], torch.stack(negs), 0.3))
    torch.testing.assert_close(loss, torch.stack(terms).mean(), atol=1e-5, rtol=1e-5)
    assert stats["boxes"] == 5
