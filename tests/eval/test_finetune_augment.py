"""Fine-tuning augmentation (albumentations): image, class mask, boxes and instance masks stay
aligned, checked against references that do not use the transform (torch.flip, hand formulas,
boxes recomputed from the transformed masks)."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import masks_to_boxes

from densessl.errors import RecipeError
from densessl.eval.augmentation import AugmentedSamples, build_transform
from densessl.recipe import load_recipe

SIZE = 48


def _sample(channels: int = 3) -> dict:
    """Two rectangles, classes 3 and 5, and an image whose channel 0 encodes the class."""
    mask = torch.zeros(SIZE, SIZE, dtype=torch.long)
    mask[5:20, 8:30] = 3
    mask[28:44, 30:41] = 5
    inst = torch.stack([mask == 3, mask == 5]).to(torch.uint8)
    image = torch.rand(channels, SIZE, SIZE) * 0.1
    image[0] = mask.float() / 8
    boxes = masks_to_boxes(inst.bool())
    boxes[:, 2:] += 1  # pixel edges (x1, y1, x2, y2), as the datasets give them
    return {"image": image, "mask": mask, "boxes": boxes, "labels": torch.tensor([3, 5]),
            "instance_masks": inst}


def _cfg(**kw):
    return load_recipe({"finetune": {"augment": kw}}).finetune.augment


def test_flips_match_torch_flip_and_the_box_formula():
    s = _sample()
    t = build_transform(_cfg(hflip=1.0, vflip=1.0), (SIZE, SIZE), 3, seed=0, boxes=True)
    out = AugmentedSamples([s], t)[0]
    assert torch.equal(out["image"], s["image"].flip(-1).flip(-2))
    assert torch.equal(out["mask"], s["mask"].flip(-1).flip(-2))
    assert torch.equal(out["instance_masks"], s["instance_masks"].flip(-1).flip(-2))
    b = s["boxes"]
    expected = torch.stack([SIZE - b[:, 2], SIZE - b[:, 3], SIZE - b[:, 0], SIZE - b[:, 1]], 1)
    torch.testing.assert_close(out["boxes"], expected)
    assert out["labels"].tolist() == [3, 5]


def test_an_image_without_objects_keeps_empty_boxes_and_instances():
    # PIDray's train split has bags with no item: no instance mask for albumentations to stack
    s = _sample()
    s.update(mask=torch.zeros_like(s["mask"]), boxes=torch.zeros(0, 4),
             labels=torch.zeros(0, dtype=torch.long),
             instance_masks=torch.zeros(0, SIZE, SIZE, dtype=torch.uint8))
    cfg = _cfg(crop_scale=(0.5, 1.0), hflip=1.0, rotate90=1.0)
    out = AugmentedSamples([s], build_transform(cfg, (SIZE, SIZE), 3, seed=0, boxes=True))[0]
    assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,)
    assert out["instance_masks"].shape == (0, SIZE, SIZE)
    assert out["instance_masks"].dtype == torch.uint8


def test_crops_keep_image_mask_boxes_and_instances_together():
    cfg = _cfg(crop_scale=(0.1, 0.5), rotate90=1.0, hflip=0.5)
    t = build_transform(cfg, (SIZE, SIZE), 3, seed=3, boxes=True)
    data = AugmentedSamples([_sample() for _ in range(24)], t)
    seen_drop = False
    for i in range(24):
        out = data[i]
        img, mask = out["image"], out["mask"]
        assert img.shape == (3, SIZE, SIZE) and mask.shape == (SIZE, SIZE)
        # interior pixels (5×5 uniform class; upscaling blends up to about two pixels):
        # channel 0 still encodes the mask's class; a one-pixel shift would miss by >= 0.125
        pad = torch.nn.functional.pad(mask[None, None].float(), (2, 2, 2, 2), mode="replicate")
        uniform = (pad.unfold(2, 5, 1).unfold(3, 5, 1).reshape(SIZE, SIZE, 25)
                   .eq(mask[..., None].float()).all(-1))
        assert uniform.sum() > 50
        torch.testing.assert_close(img[0][uniform], mask[uniform].float() / 8, atol=0.02,
                                   rtol=0)
        # each kept box is its (visible) instance mask's box, and its class is the mask's
        inst = out["instance_masks"].bool()
        assert len(inst) == len(out["boxes"]) == len(out["labels"])
        seen_drop |= len(inst) < 2
        for k in range(len(inst)):
            assert (mask[inst[k]] == out["labels"][k]).all()
            ref = masks_to_boxes(inst[k][None])[0]
            ref[2:] += 1
            torch.testing.assert_close(out["boxes"][k], ref, atol=1.5, rtol=0)
    assert seen_drop  # some crops lose an instance: box, label and mask go together


def test_same_seed_same_draws_and_multispectral_gain_per_band():
    cfg = _cfg(crop_scale=(0.5, 1.0), photometric=1.0)
    samples = [_sample(13)] * 4
    a = AugmentedSamples(samples, build_transform(cfg, (SIZE, SIZE), 13, seed=7))
    b = AugmentedSamples(samples, build_transform(cfg, (SIZE, SIZE), 13, seed=7))
    c = AugmentedSamples(samples, build_transform(cfg, (SIZE, SIZE), 13, seed=8))
    # one stream of draws per transform (the fine-tuning loader reads it in a seeded order)
    first = [a[i]["image"] for i in range(4)]
    for i in range(4):
        torch.testing.assert_close(b[i]["image"], first[i])
    assert not torch.equal(c[0]["image"], first[0])  # the seed matters
    assert "boxes" not in a[0]  # segmentation: no stale geometry handed on
    # per-band gain: each band of a constant image scales by its own factor
    flat = {"image": torch.full((13, SIZE, SIZE), 0.5), "mask": torch.zeros(SIZE, SIZE,
                                                                            dtype=torch.long)}
    out = AugmentedSamples([flat], build_transform(_cfg(hflip=0.0, photometric=1.0),
                                                   (SIZE, SIZE), 13, seed=1))[0]["image"]
    gains = out.mean((1, 2)) / 0.5
    assert torch.allclose(out, out.mean((1, 2), keepdim=True).expand_as(out))  # not per pixel
    assert gains.min() >= 0.9 - 1e-4 and gains.max() <= 1.1 + 1e-4 and gains.std() > 0.005


def test_nothing_enabled_is_no_transform_and_bad_values_name_the_key():
    assert build_transform(_cfg(hflip=0.0), (SIZE, SIZE), 3, seed=0) is None
    with pytest.raises(RecipeError, match=r"finetune\.augment\.crop_scale"):
        load_recipe({"finetune": {"augment": {"crop_scale": [0.8, 0.5]}}})
    with pytest.raises(RecipeError, match=r"finetune\.augment\.hflip"):
        load_recipe({"finetune": {"augment": {"hflip": 1.5}}})
