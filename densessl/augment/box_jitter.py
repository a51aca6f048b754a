"""Query-box jitter: InsLoc's localisation pretext (Yang et al. 2021, "Instance Localization for
Self-supervised Detection Pretraining").

InsLoc pools the query (view A) from a box that is *not* the instance's own box but a random
box around it, and the key (view B) from the true box, so the embedding has to tell how well a
box covers the instance. Its magnitude, in the reference code (github limbo0000/InstanceLoc):
``mmdet/models/dense_heads/anchor_aug.py`` keeps the anchors with IoU > ``iou_thr`` = 0.5
(``configs/FPN/insloc_fpn_200ep.py``, ``train_cfg.rpn_proposal``) to the box, scores them at
random, and ``InsLocFPN.get_stage2_bboxes`` (``mmdet/models/detectors/insloc_fpn.py``) picks one
at random; ``box_replaced_with_gt=[True, True, True, False]`` uses that box on P5 only (P2–P4
pool the true box).

Here the candidates are continuous instead of anchors of a stride-16 grid (an X-ray view of
64 px has boxes far smaller than InsLoc's 32–256 px anchors): centre shift uniform in
±½ of the box's side and each side scaled log-uniformly in [½, 2]. Every box with IoU > 0.5
lies in that range (IoU > 0.5 needs each side within ×2 and the centre within ½ side), so the
pick is uniform (in that measure) over InsLoc's set. Fixed shapes, no host read: a GPU step
never waits for it.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: InsLoc's threshold: a jittered box keeps IoU > 0.5 with the instance's box (anchor_aug.py).
INSLOC_MIN_IOU = 0.5
#: Candidate range that covers every box with IoU > 0.5: centre within ±½ side, sides ×[½, 2].
MAX_SHIFT, MAX_SCALE = 0.5, 2.0


def paired_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of matching xyxy boxes ``a[..., i]`` and ``b[..., i]`` (broadcast) → ``…``; 0 for
    empty boxes."""
    wh = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2]))
    inter = wh.clamp_min(0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp_min(0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp_min(0).prod(-1)
    return inter / (area_a + area_b - inter).clamp_min(1e-6)


def jitter_boxes(boxes: Tensor, height: int, width: int, min_iou: float = INSLOC_MIN_IOU,
                 candidates: int = 64, generator: torch.Generator | None = None) -> Tensor:
    """A random box around each box, with IoU > ``min_iou`` to it, inside the view.

    Args:
        boxes: N×4 xyxy in view pixels (COCO edges, the view spans ``[0, width] × [0, height]``).
        height, width: the view's size; candidates are clipped to it before their IoU is read.
        min_iou: strict lower bound on the IoU with the original box (InsLoc: 0.5).
        candidates: draws per box; about 1 in 10 passes at 0.5, so with 64 a box keeps its own
            (unjittered) box with probability ~0.1 % (InsLoc falls back to its best anchors).
        generator: optional, on ``boxes.device``.

    Returns:
        N×4 on ``boxes.device``; a box none of whose candidates passes is returned unchanged.
    """
    if not 0 <= min_iou < 1:
        raise ValueError(f"min_iou must be in [0, 1), got {min_iou}")
    n = boxes.shape[0]
    boxes = boxes.float()
    u = torch.rand(n, candidates, 5, device=boxes.device, generator=generator)
    wh = (boxes[:, 2:] - boxes[:, :2])[:, None]
    centre = ((boxes[:, :2] + boxes[:, 2:]) / 2)[:, None] + (2 * u[..., :2] - 1) * MAX_SHIFT * wh
    half = wh * MAX_SCALE ** (2 * u[..., 2:4] - 1) / 2
    limit = boxes.new_tensor([width, height, width, height])
    cand = torch.minimum(torch.cat([centre - half, centre + half], -1).clamp_min(0), limit)
    ok = paired_iou(cand, boxes[:, None]) > min_iou
    # uniform among the passing candidates: the largest random score, failing ones at -1
    pick = torch.where(ok, u[..., 4], -1.0).argmax(dim=1)
    chosen = cand.gather(1, pick[:, None, None].expand(n, 1, 4))[:, 0]
    return torch.where(ok.any(dim=1, keepdim=True), chosen, boxes)
