"""Labels resized for evaluation stay on the image they describe.

A labelled square is drawn into an image and its label map; both go through a loader's resize
to 64 px. The centroid of the resized label must sit where the centroid of the (bilinear)
resized image is. Averaged over square positions, ``nearest`` is off by (s − 1)/2 input pixels
(+0.25 px at 128→64, +0.40 px at 160→64); sampling on the bilinear grid is off by ~0.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from densessl.contract import PairSample
from densessl.data.labeled.xbd import XBDSegmentation
from densessl.data.noisy_seg import load_scene as load_noisy_seg
from densessl.data.pidray import PIDRAY_CLASSES, PIDray
from densessl.data.resize import resize_image, resize_labels
from densessl.pairs import NoisyPairs, PairBuilder

OUT = 64
SIZES = (128, 160)
OFFSETS = range(10)  # square positions: every edge phase of the 2× and 2.5× grids, equally often
CLASS = 3


def _square(n, offset):
    """n×n float image with a bright 37×29 square (odd sides, so edges fall between output
    pixels differently at each offset) and its label map (CLASS inside, 0 outside)."""
    image = np.zeros((n, n), np.float32)
    y0, x0 = 40 + offset, 31 + offset
    image[y0:y0 + 37, x0:x0 + 29] = 1.0
    return image, (image > 0).astype(np.int64) * CLASS


def _centroid(weights):
    """(x, y) centroid of an H×W weight map, float64."""
    w = np.asarray(weights, np.float64)
    ys, xs = np.mgrid[: w.shape[0], : w.shape[1]]
    return np.array([(w * xs).sum(), (w * ys).sum()]) / w.sum()


def _mean_shift(pairs):
    """Mean (label centroid − image centroid) over (resized image, resized label) pairs."""
    shifts = [_centroid(np.asarray(label) == CLASS) - _centroid(np.asarray(image))
              for image, label in pairs]
    return np.mean(shifts, axis=0)


def _check(resize_fn):
    for n in SIZES:
        shift = _mean_shift(resize_fn(*_square(n, o)) for o in OFFSETS)
        assert np.abs(shift).max() < 0.05, f"{n}→{OUT}: labels shifted by {shift} px"


def test_helper_keeps_labels_on_the_image():
    def resize(image, label):
        size = (OUT, OUT)
        return (resize_image(torch.from_numpy(image)[None], size)[0],
                resize_labels(torch.from_numpy(label), size))
    _check(resize)


def test_helper_keeps_dtypes_and_instance_stacks():
    masks = torch.zeros(2, 128, 128, dtype=torch.bool)
    masks[0, 10:50, 10:50] = True
    out = resize_labels(masks, (OUT, OUT))
    assert out.dtype == torch.bool and out.shape == (2, OUT, OUT) and not out[1].any()
    with pytest.raises(ValueError, match="H×W or N×H×W masks"):
        resize_labels(torch.zeros(1, 1, 4, 4, dtype=torch.bool), (2, 2))
    with pytest.raises(ValueError, match="integer label map"):
        resize_labels(torch.zeros(4, 4), (2, 2))


def test_pidray_eval_resize(tmp_path):
    root = tmp_path / "pidray"
    (root / "annotations").mkdir(parents=True)
    (root / "train").mkdir()
    images, anns = [], []
    for n in SIZES:
        for o in OFFSETS:
            image, label = _square(n, o)
            name = f"{n}_{o}.png"
            rgb = Image.fromarray((image * 255).astype(np.uint8)).convert("RGB")
            rgb.save(root / "train" / name)
            rle = mask_utils.encode(np.asfortranarray((label > 0).astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            image_id = len(images) + 1
            images.append({"id": image_id, "file_name": name, "height": n, "width": n})
            anns.append({"id": image_id, "image_id": image_id, "category_id": CLASS,
                         "segmentation": rle, "iscrowd": 0, "area": int((label > 0).sum()),
                         "bbox": [0, 0, 1, 1]})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(PIDRAY_CLASSES)]
    (root / "annotations" / "xray_train.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": categories}))
    data = PIDray(root, image_size=OUT)
    by_size = {n: [] for n in SIZES}
    for i, rec in enumerate(data.records):
        sample = data[i]
        by_size[rec["height"]].append((sample["image"][0], sample["mask"]))
        # instance masks (and so the boxes) are on the same grid as the semantic map
        assert torch.equal(sample["instance_masks"][0], sample["mask"] == CLASS)
    for n in SIZES:
        shift = _mean_shift(by_size[n])
        assert np.abs(shift).max() < 0.05, f"PIDray {n}→{OUT}: labels shifted by {shift} px"


def test_xbd_eval_resize():
    def resize(image, label):
        item = {"image_t0": torch.from_numpy(image)[None].repeat(3, 1, 1),
                "mask": torch.from_numpy(label)}
        out = XBDSegmentation([item], task="buildings", image_size=OUT)[0]
        return out["image"][0], out["mask"]
    _check(resize)


def test_noisy_seg_resize(tmp_path):
    def resize(image, label):
        Image.fromarray((image * 255).astype(np.uint8)).convert("RGB").save(tmp_path / "i.png")
        Image.fromarray(label.astype(np.uint8)).save(tmp_path / "l.png")
        out, labels = load_noisy_seg(tmp_path, {"image": "i.png", "label": "l.png"}, OUT)
        return out[0], labels
    _check(resize)


class _Donors(PairBuilder):
    """Sample 0 is 64 px; the others (the mismatch donors) are n px with a nodata mask that is
    False exactly where their source B shows the square."""

    def __init__(self, n, offset):
        self.n, self.offset = n, offset

    def __len__(self):
        return 2

    def build(self, index):
        if index == 0:
            return PairSample(source_a=torch.zeros(1, OUT, OUT), source_b=torch.zeros(1, OUT, OUT))
        image, label = _square(self.n, self.offset)
        image = torch.from_numpy(image)[None]
        return PairSample(source_a=image, source_b=image.clone(),
                          valid_b=torch.from_numpy(label) == 0)


def test_mismatch_donor_nodata_mask_resize():
    def resize(image, label):
        del label
        n, o = resize.args
        s = NoisyPairs(_Donors(n, o), "mismatch", amount=1.0)[0]
        return s.source_b[0], (~s.valid_b).long() * CLASS
    for n in SIZES:
        pairs = []
        for o in OFFSETS:
            resize.args = (n, o)
            pairs.append(resize(None, None))
        shift = _mean_shift(pairs)
        assert np.abs(shift).max() < 0.05, f"mismatch donor {n}→{OUT}: nodata shifted by {shift}"
