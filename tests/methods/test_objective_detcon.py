"""Issue #28 item 3: DetCon's mask-pooled contrast, added through the objective registry
(densessl/methods/objectives/detcon.py), against a float64 loop reference, and a recipe with
only that objective trains."""

from __future__ import annotations

import math

import pytest
import torch

from densessl.cells import cell_offset
from densessl.methods.objectives import OBJECTIVES
from densessl.methods.objectives.detcon import detcon_loss, segment_masks
from densessl.recipe import DetConConfig, load_recipe

B, D, H, W, STRIDE = 3, 5, 4, 6, 8


def bilinear_border(feature: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """D-vector of a D×h×w map at cell coordinates (x, y), edge cells beyond the border."""
    _, h, w = feature.shape
    x, y = min(max(x, 0.0), w - 1.0), min(max(y, 0.0), h - 1.0)
    x0, y0 = int(math.floor(x)), int(math.floor(y))
    x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
    fx, fy = x - x0, y - y0
    return ((1 - fx) * (1 - fy) * feature[:, y0, x0] + fx * (1 - fy) * feature[:, y0, x1]
            + (1 - fx) * fy * feature[:, y1, x0] + fx * fy * feature[:, y1, x1])


def reference(q_dense, k_dense, grid_ab, valid_ab, class_map, temperature, max_classes,
              background, min_cells, alignment, pair_weight=None):
    """One segment at a time, in float64, from the definitions."""
    b, d, h, w = q_dense.shape
    fh, fw = k_dense.shape[-2:]
    offset = cell_offset(STRIDE, alignment)
    slots = max_classes + int(background)
    queries, keys, images = [], [], []
    for i in range(b):
        for s in range(slots):
            members = []
            for y in range(h):
                for x in range(w):
                    if not valid_ab[i, y, x]:
                        continue
                    c = -1 if class_map is None else int(class_map[i, y, x])
                    if class_map is None:
                        seg = 0
                    elif c < 0:
                        seg = max_classes if background else None
                    else:
                        seg = c if c < max_classes else None
                    if seg == s:
                        members.append((y, x))
            if len(members) < min_cells or (class_map is None and s > 0):
                continue
            q = sum(q_dense[i, :, y, x] for y, x in members) / len(members)
            ks = []
            for y, x in members:
                u, v = grid_ab[i, y, x].tolist()
                px = ((u + 1) * fw * STRIDE - 1) / 2  # view-B pixel (align_corners=False)
                py = ((v + 1) * fh * STRIDE - 1) / 2
                ks.append(bilinear_border(k_dense[i], (px - offset) / STRIDE,
                                          (py - offset) / STRIDE))
            k = sum(ks) / len(ks)
            queries.append(q / q.norm())
            keys.append(k / k.norm())
            images.append(i)
    total, count = 0.0, len(queries)
    for n, q in enumerate(queries):
        logits = torch.stack([q @ k for k in keys]) / temperature
        term = -(logits[n] - torch.logsumexp(logits, 0))
        factor = 1.0 if pair_weight is None else float(pair_weight[images[n]])
        total = total + factor * term
    return total / max(count, 1), count


def batch(seed: int, with_classes: bool = True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, D, H, W, generator=g, dtype=torch.float64)
    k = torch.randn(B, D, H + 1, W - 1, generator=g, dtype=torch.float64)
    grid = torch.rand(B, H, W, 2, generator=g, dtype=torch.float64) * 2.4 - 1.2
    valid = torch.rand(B, H, W, generator=g) > 0.2
    classes = torch.randint(-1, 4, (B, H, W), generator=g) if with_classes else None
    return q, k, grid, valid, classes


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("alignment", ["centre", "block"])
def test_matches_the_float64_loop(seed, background, alignment):
    q, k, grid, valid, classes = batch(seed)
    # max_classes 3: class 3 is in no segment; min_cells 2 drops one-cell segments
    loss, stats, queries = detcon_loss(q, k, grid, valid, classes, 0.3, 3, background,
                                       min_cells=2, stride=STRIDE, alignment=alignment)
    expected, count = reference(q, k, grid, valid, classes, 0.3, 3, background, 2, alignment)
    assert loss.dtype == torch.float64
    assert count > 3 and int(stats["masks"]) == count
    assert torch.allclose(loss, torch.as_tensor(expected), rtol=1e-10, atol=1e-12)
    assert int(queries["keep"].sum()) == count


def test_pair_weight_and_no_class_map():
    q, k, grid, valid, _ = batch(2, with_classes=False)
    weight = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    loss, stats, _ = detcon_loss(q, k, grid, valid, None, 0.2, 7, stride=STRIDE,
                                 pair_weight=weight)
    expected, count = reference(q, k, grid, valid, None, 0.2, 7, False, 1, "centre", weight)
    assert count == B and int(stats["masks"]) == B  # one segment per image
    assert torch.allclose(loss, torch.as_tensor(expected), rtol=1e-10, atol=1e-12)


def test_gradient_reaches_the_queries_only_through_kept_segments():
    q, k, grid, valid, classes = batch(3)
    q = q.float().requires_grad_(True)
    valid[0] = False  # image 0 has no segment at all
    loss, _, _ = detcon_loss(q, k.float(), grid.float(), valid, classes, 0.1, 4,
                             stride=STRIDE)
    loss.backward()
    assert torch.isfinite(q.grad).all() and q.grad[0].abs().sum() == 0
    assert q.grad[1:].abs().sum() > 0


def test_segment_masks_fixed_slots():
    classes = torch.tensor([[[0, 1], [-1, 5]]])
    valid = torch.tensor([[[True, True], [True, True]]])
    masks = segment_masks(classes, valid, 3, background=True)
    assert masks.shape == (1, 4, 4)
    assert masks[0].argmax(1).tolist()[:3] == [0, 1, 3] and masks[0, 3].sum() == 0


def test_registered_with_its_config_section():
    assert OBJECTIVES["detcon"][0] is DetConConfig
    recipe = load_recipe({"name": "d", "loss": {"detcon": {"weight": 1.0}}})
    assert recipe.loss.detcon.weight == 1.0


def test_a_recipe_with_only_detcon_trains(tmp_path):
    from densessl.workflows.pretraining import pretrain

    overrides = ["pairs.options.synthetic_n=16", "model.split_bn_groups=2",
                 "loss.dense.weight=0", "loss.instance.weight=0", "loss.global.weight=0",
                 "loss.detcon.weight=1.0", "train.max_steps=2", "train.batch_size=4",
                 "train.num_workers=0", "train.log_every=1"]
    metrics = pretrain("demo", tmp_path / "run", overrides=overrides)
    final = metrics["final"] if "final" in metrics else metrics
    assert math.isfinite(final["loss_detcon"]) and final["detcon_masks"] > 0
    assert "loss_dense" not in final and "loss_instance" not in final
    assert final["loss"] == pytest.approx(final["loss_detcon"])
