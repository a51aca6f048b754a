"""coco labeled dataset on COCO JSONs written by the test: category ids 3 and 17, a polygon,
compressed / uncompressed / crowd RLE, a box-only annotation, 12-bit PNGs, and every error."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from densessl import cli
from densessl.data.labeled.build import build_eval_dataset
from densessl.data.labeled.coco import coco_labeled
from densessl.errors import DataError

S = 48
#: listed out of id order on purpose: classes follow the ids (3 → 1, 17 → 2)
CATEGORIES = [{"id": 17, "name": "tank"}, {"id": 3, "name": "car"}]


def rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE by hand: run lengths over the column-major pixels, zeros first."""
    flat = mask.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return ([0] + runs) if flat[0] else runs


def shapes():
    """Shapes drawn with numpy (areas known) for image 1."""
    disk = np.zeros((S, S), bool)
    yy, xx = np.mgrid[:S, :S]
    disk[(yy - 32) ** 2 + (xx - 12) ** 2 <= 36] = True           # compressed RLE, tank
    ell = np.zeros((S, S), bool)
    ell[26:40, 28:31] = True
    ell[37:40, 28:40] = True                                     # uncompressed RLE, car
    crowd = np.zeros((S, S), bool)
    crowd[2:8, 30:46] = True                                     # crowd RLE, tank
    return disk, ell, crowd


def write_image(path, value=1000):
    """A 12-bit image in a 16-bit PNG: 4095 and 2048 at known pixels."""
    img = np.full((S, S), value, np.uint16)
    img[0, 0], img[0, 1] = 4095, 2048
    Image.fromarray(img).save(path)


def write_coco(root, name="train", images=("a.png", "b.png"), extra_anns=(), cats=CATEGORIES):
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    disk, ell, crowd = shapes()
    entries = []
    for k, file_name in enumerate(images):
        write_image(root / "imgs" / file_name)
        entries.append({"id": k + 1, "file_name": f"imgs/{file_name}", "height": S, "width": S})
    compressed = mask_utils.encode(np.asfortranarray(disk.astype(np.uint8)))
    crowd_rle = mask_utils.encode(np.asfortranarray(crowd.astype(np.uint8)))
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "iscrowd": 0,      # polygon rectangle
         "segmentation": [[4, 6, 20, 6, 20, 18, 4, 18]], "bbox": [4, 6, 16, 12]},
        {"id": 2, "image_id": 1, "category_id": 17, "iscrowd": 0,
         "segmentation": {"size": [S, S], "counts": compressed["counts"].decode("ascii")}},
        {"id": 3, "image_id": 1, "category_id": 3, "iscrowd": 0,
         "segmentation": {"size": [S, S], "counts": rle_counts(ell)}},
        {"id": 4, "image_id": 1, "category_id": 17, "iscrowd": 1,
         "segmentation": {"size": [S, S], "counts": crowd_rle["counts"].decode("ascii")}},
        *extra_anns]
    coco = {"images": entries, "annotations": anns, "categories": cats}
    path = root / "annotations" / f"{name}.json"
    path.write_text(json.dumps(coco))
    return path


@pytest.fixture
def coco_root(tmp_path):
    root = tmp_path / "set"
    write_coco(root, "train")
    write_coco(root, "test", images=("c.png",))
    return root


def test_masks_boxes_and_classes_match_numpy_shapes(coco_root):
    data = coco_labeled({"train": "annotations/train.json", "test": "annotations/test.json"},
                        path=str(coco_root), image_size=S, channels=1)
    assert data.class_names == ["background", "car", "tank"]
    assert data.keys == {"image", "mask", "boxes", "labels", "instance_masks"}
    assert list(data.eval_splits()) == ["test"]
    sample = data.train[0]
    disk, ell, crowd = shapes()
    # polygon by pycocotools vs pixel centres inside the rectangle [4, 20] × [6, 18]
    yy, xx = np.mgrid[:S, :S]
    rect = (xx + 0.5 > 4) & (xx + 0.5 < 20) & (yy + 0.5 > 6) & (yy + 0.5 < 18)
    assert rect.sum() == 16 * 12
    expected = [rect, disk, ell]  # the crowd annotation is no instance
    assert sample["labels"].tolist() == [1, 2, 1]
    inst = sample["instance_masks"].numpy()
    assert inst.shape == (3, S, S)
    for got, want in zip(inst, expected):
        assert np.array_equal(got, want)
    for box, want in zip(sample["boxes"].tolist(), expected):
        ys, xs = np.nonzero(want)
        assert box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    semantic = np.zeros((S, S), np.int64)
    semantic[rect], semantic[disk], semantic[ell], semantic[crowd] = 1, 2, 1, 255
    assert np.array_equal(sample["mask"].numpy(), semantic)
    assert (sample["mask"].numpy() == 255).sum() == 6 * 16
    assert data.train[1]["labels"].tolist() == [] and (data.train[1]["mask"] == 0).all()


def test_12bit_images_scale_by_4095(coco_root):
    data = coco_labeled({"train": "annotations/train.json", "test": "annotations/test.json"},
                        path=str(coco_root), image_size=S, channels=1)
    assert data.bit_depth == 12
    image = data.test["test"][0]["image"]
    assert image[0, 0, 0].item() == pytest.approx(4095 / 4095)
    assert image[0, 0, 1].item() == pytest.approx(2048 / 4095)
    assert image[0, 9, 9].item() == pytest.approx(1000 / 4095)
    rgb = coco_labeled({"train": "annotations/train.json", "test": "annotations/test.json"},
                       path=str(coco_root), image_size=S, channels=3, bit_depth=16)
    assert rgb.train[0]["image"].shape == (3, S, S)
    assert rgb.train[0]["image"][2, 0, 0].item() == pytest.approx(4095 / 65535)


def test_resize_boxes_follow_masks(coco_root):
    data = coco_labeled({"train": "annotations/train.json", "test": "annotations/test.json"},
                        path=str(coco_root), image_size=24, channels=1)
    sample = data.train[0]
    assert sample["mask"].shape == (24, 24) and sample["instance_masks"].shape[1:] == (24, 24)
    # the rectangle [4, 20] × [6, 18] halves exactly to [2, 10] × [3, 9]
    assert sample["boxes"][0].tolist() == [2.0, 3.0, 10.0, 9.0]
    assert set(np.unique(sample["mask"].numpy()).tolist()) <= {0, 1, 2, 255}


def test_box_only_annotation_boxes_and_ignored_pixels(tmp_path):
    box_only = {"id": 5, "image_id": 2, "category_id": 17, "iscrowd": 0, "segmentation": [],
                "bbox": [8.5, 10, 12, 6]}
    write_coco(tmp_path, "train", extra_anns=[box_only])
    write_coco(tmp_path, "val", images=("c.png",))
    data = coco_labeled(None, path=str(tmp_path), image_size=S, channels=1)  # annotations/*.json
    assert list(data.eval_splits()) == ["val"]
    assert "instance_masks" not in data.keys  # Mask R-CNN would learn box-shaped masks
    sample = data.train[1]
    assert "instance_masks" not in sample
    assert sample["labels"].tolist() == [2]
    assert sample["boxes"].tolist() == [[8.5, 10.0, 20.5, 16.0]]
    ignored = np.zeros((S, S), bool)
    ignored[10:16, 8:21] = True  # every pixel the box touches: unknown, neither object nor bg
    assert np.array_equal(sample["mask"].numpy() == 255, ignored)
    assert (sample["mask"].numpy()[~ignored] == 0).all()
    half = coco_labeled(None, path=str(tmp_path), image_size=24, channels=1).train[1]
    assert half["boxes"].tolist() == [[4.25, 5.0, 10.25, 8.0]]


def test_later_annotations_paint_over_earlier(tmp_path):
    first = {"id": 5, "image_id": 2, "category_id": 3, "iscrowd": 0,
             "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]]}
    second = {"id": 6, "image_id": 2, "category_id": 17, "iscrowd": 0,
              "segmentation": [[20, 20, 40, 20, 40, 40, 20, 40]]}
    write_coco(tmp_path, "train", extra_anns=[first, second])
    write_coco(tmp_path, "test", images=("c.png",))
    sample = coco_labeled(None, path=str(tmp_path), image_size=S, channels=1).train[1]
    mask = sample["mask"].numpy()
    assert (mask[20:30, 20:30] == 2).all() and (mask[10:20, 10:30] == 1).all()
    assert (mask == 1).sum() == 400 - 100 and (mask == 2).sum() == 400
    # instance masks are whole: the overlap belongs to both instances
    assert sample["instance_masks"].flatten(1).sum(1).tolist() == [400, 400]


def test_missing_images_named_and_counted(coco_root):
    path = coco_root / "annotations" / "train.json"
    coco = json.loads(path.read_text())
    coco["images"][0]["file_name"] = "imgs/nope.png"
    coco["images"][1]["file_name"] = "imgs/gone.png"
    path.write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"train\.json: image id 1 points at missing file "
                       r".*nope\.png \(2 of 2 image files missing\)"):
        coco_labeled({"train": str(path), "test": "annotations/test.json"}, path=str(coco_root))


@pytest.mark.parametrize("problem, expected", [
    ("not_coco", r"train\.json: missing list 'images'"),
    ("unknown_category", r"train\.json: annotation id 1 \(image id 1\): unknown category id 99"),
    ("unknown_image", r"train\.json: annotation id 1 \(image id 42\): no image with this id"),
    ("image_lacks_key", r"train\.json: images\[0\] lacks \['height'\]"),
])
def test_bad_json_errors_name_file_and_entry(coco_root, problem, expected):
    path = coco_root / "annotations" / "train.json"
    coco = json.loads(path.read_text())
    if problem == "not_coco":
        del coco["images"]
    elif problem == "unknown_category":
        coco["annotations"][0]["category_id"] = 99
    elif problem == "unknown_image":
        coco["annotations"][0]["image_id"] = 42
    else:
        del coco["images"][0]["height"]
    path.write_text(json.dumps(coco))
    with pytest.raises(DataError, match=expected):
        coco_labeled({"train": "annotations/train.json", "test": "annotations/test.json"},
                     path=str(coco_root))


def test_split_keys_and_categories_must_agree(coco_root):
    with pytest.raises(DataError, match="no 'train' file"):
        coco_labeled({"test": "annotations/test.json"}, path=str(coco_root))
    with pytest.raises(DataError, match="only a train file"):
        coco_labeled({"train": "annotations/train.json"}, path=str(coco_root))
    with pytest.warns(UserWarning, match=r"val\.json: 1 image\(s\) are also in the train"):
        write_coco(coco_root, "val", images=("b.png",))  # b.png is a train image too
        coco_labeled({"train": "annotations/train.json", "val": "annotations/val.json"},
                     path=str(coco_root))
    write_coco(coco_root, "night", images=("n.png",), cats=[{"id": 3, "name": "car"}])
    with pytest.raises(DataError, match=r"night\.json: categories .* differ from the train"):
        coco_labeled({"train": "annotations/train.json", "night": "annotations/night.json"},
                     path=str(coco_root))


def test_registry_several_test_subsets_and_inspector(coco_root, capsys):
    write_coco(coco_root, "night", images=("n1.png", "n2.png"))
    data = build_eval_dataset(
        "coco", {"annotations": {"train": "annotations/train.json",
                                 "test": "annotations/test.json",
                                 "night": "annotations/night.json"}},
        path=str(coco_root), image_size=64, channels=1)
    assert sorted(data.eval_splits()) == ["night", "test"] and len(data.test["night"]) == 2
    sample = data.test["night"][0]
    assert sample["image"].shape == (1, 64, 64) and sample["mask"].shape == (64, 64)
    (coco_root / "imgs" / "n2.png").unlink()
    assert cli.main(["data", "inspect", str(coco_root), "--format", "coco"]) == 0
    report = json.loads(capsys.readouterr().out)
    night = report["files"]["night.json"]
    assert night == {"images": 2, "annotations": 4, "crowd": 1, "box_only": 0,
                     "categories": {"17": "tank", "3": "car"}, "missing_images": 1,
                     "first_missing": ["imgs/n2.png"]}
    assert report["categories_agree"] and report["files"]["train.json"]["missing_images"] == 0
