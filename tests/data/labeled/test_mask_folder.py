"""mask_folder labeled dataset on fixtures written in the real layout (images/, masks/,
classes.txt, splits/): ids, ignore, remapped values, 12-bit PNGs, splits and every error."""

import json

import numpy as np
import pytest
from PIL import Image

from densessl import cli
from densessl.data.labeled.build import build_eval_dataset
from densessl.data.labeled.mask_folder import mask_folder_labeled
from densessl.errors import DataError, RecipeError

S = 48


def scene_mask(k: int = 0) -> np.ndarray:
    """Class 1: a 12×10 block; class 2: two 5×5 squares apart; 255: a 2-px ignore stripe."""
    m = np.zeros((S, S), np.uint8)
    m[4:14, 6 + k:18 + k] = 1           # 10 rows × 12 cols = 120 px
    m[30:35, 4:9] = 2                   # 25 px
    m[30:35, 30:35] = 2                 # 25 px, a separate component
    m[44:46, :] = 255                   # ignore
    return m


def write_folder(root, masks: dict, images: dict | None = None, classes=None, splits=None,
                 mask_ext=".png", image_ext=".png"):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for stem, mask in masks.items():
        Image.fromarray(mask).save(root / "masks" / f"{stem}{mask_ext}")
    images = images if images is not None else {
        stem: np.full((*m.shape, 3), 200, np.uint8) for stem, m in masks.items()}
    for stem, image in images.items():
        Image.fromarray(image).save(root / "images" / f"{stem}{image_ext}")
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n\n")
    if splits is not None:
        (root / "splits").mkdir()
        for name, stems in splits.items():
            (root / "splits" / f"{name}.txt").write_text("\n".join(stems) + "\n")
    return root


def test_ids_ignore_and_instances_match_drawn_shapes(tmp_path):
    root = write_folder(tmp_path / "d", {f"s{k}": scene_mask(k) for k in range(5)},
                        classes=["background", "field", "building"])
    data = mask_folder_labeled(str(root), image_size=S, channels=3, seed=0)
    assert data.class_names == ["background", "field", "building"]
    assert data.keys == {"image", "mask", "boxes", "labels", "instance_masks"}
    split = data.train
    for i in range(len(split)):
        sample = split[i]
        stem = split.pairs[i][0].stem
        k = int(stem[1:])
        expected = scene_mask(k)
        assert np.array_equal(sample["mask"].numpy(), expected)  # no resize: ids as written
        assert sample["image"].shape == (3, S, S)
        assert sample["image"][0, 0, 0].item() == pytest.approx(200 / 255)
        # one instance per connected component: the block and the two squares; 255 is not one
        order = np.argsort(sample["labels"].numpy(), kind="stable")
        assert sample["labels"][order].tolist() == [1, 2, 2]
        areas = sample["instance_masks"][order].flatten(1).sum(1).tolist()
        assert areas == [120, 25, 25]
        boxes = sorted(map(tuple, sample["boxes"].tolist()))
        assert boxes == sorted([(6 + k, 4, 18 + k, 14), (4, 30, 9, 35), (30, 30, 35, 35)])


def test_resize_keeps_ids_unblended(tmp_path):
    root = write_folder(tmp_path / "d", {f"s{k}": scene_mask(k) for k in range(5)})
    data = mask_folder_labeled(str(root), image_size=20, channels=1)
    sample = data.train[0]
    assert sample["image"].shape == (1, 20, 20) and sample["mask"].shape == (20, 20)
    # bilinear blending of 1 and 2 would make 1.5 → no: only written ids survive
    assert set(np.unique(sample["mask"].numpy()).tolist()) <= {0, 1, 2, 255}
    assert data.class_names == ["class_0", "class_1", "class_2"]  # largest id 2, 255 not a class


def test_12bit_png_decodes_by_4095(tmp_path):
    masks = {f"x{k}": scene_mask() for k in range(5)}
    images = {}
    for stem in masks:
        img = np.full((S, S), 1000, np.uint16)
        img[0, 0], img[0, 1] = 4095, 2048
        images[stem] = img
    root = write_folder(tmp_path / "d", masks, images)
    assert Image.open(next((root / "images").iterdir())).mode.startswith("I")  # a 16-bit file
    data = mask_folder_labeled(str(root), image_size=S, channels=1)
    assert data.bit_depth == 12
    image = data.train[0]["image"]
    assert image[0, 0, 0].item() == pytest.approx(1.0)
    assert image[0, 0, 1].item() == pytest.approx(2048 / 4095)
    assert image[0, 5, 5].item() == pytest.approx(1000 / 4095)
    fixed = mask_folder_labeled(str(root), image_size=S, channels=1, bit_depth=16)
    assert fixed.train[0]["image"][0, 0, 0].item() == pytest.approx(4095 / 65535)


def test_class_values_remapped_and_others_rejected(tmp_path):
    raw = np.zeros((S, S), np.uint8)
    raw[:10] = 10
    raw[10:15] = 20
    raw[40:] = 255
    root = write_folder(tmp_path / "d", {f"w{k}": raw for k in range(5)})
    data = mask_folder_labeled(str(root), image_size=S, class_values=[0, 10, 20])
    mask = data.train[0]["mask"].numpy()
    assert (mask[:10] == 1).all() and (mask[10:15] == 2).all() and (mask[15:40] == 0).all()
    assert (mask[40:] == 255).all()
    assert data.class_names == ["class_0", "class_10", "class_20"]
    bad = raw.copy()
    bad[20, 20] = 30
    Image.fromarray(bad).save(root / "masks" / "w3.png")
    with pytest.raises(DataError, match=r"w3\.png: mask value 30 is not one of class_values"):
        mask_folder_labeled(str(root), class_values=[0, 10, 20])


def test_seeded_split_recorded_repeatable_and_root_untouched(tmp_path):
    root = write_folder(tmp_path / "d", {f"s{k:02d}": scene_mask() for k in range(10)})
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    a = mask_folder_labeled(str(root), seed=3)
    rec = a.split_record
    assert rec["method"] == "seeded" and rec["seed"] == 3
    assert (len(rec["train"]), len(rec["val"]), len(rec["test"])) == (6, 2, 2)
    assert sorted(rec["train"] + rec["val"] + rec["test"]) == [f"s{k:02d}" for k in range(10)]
    assert [p[0].stem for p in a.test["test"].pairs] == rec["test"]
    assert list(a.eval_splits()) == ["test"]
    assert mask_folder_labeled(str(root), seed=3).split_record == rec
    other = mask_folder_labeled(str(root), seed=4).split_record
    assert (other["val"], other["test"]) != (rec["val"], rec["test"])  # the seed decides
    no_test = mask_folder_labeled(str(root), seed=3, test_fraction=0.0)
    assert not no_test.split_record["test"] and list(no_test.eval_splits()) == ["val"]
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


def test_split_files_used_and_missing_stem_named(tmp_path):
    stems = [f"s{k}" for k in range(5)]
    root = write_folder(tmp_path / "d", {s: scene_mask() for s in stems},
                        splits={"train": stems[:3], "val": stems[3:]})
    data = mask_folder_labeled(str(root))
    assert data.split_record == {"method": "files", "train": stems[:3], "val": stems[3:],
                                 "test": []}
    assert list(data.eval_splits()) == ["val"] and len(data.val) == 2
    (root / "splits" / "test.txt").write_text("s9\n")
    with pytest.raises(DataError, match=r"test\.txt: stem 's9'"):
        mask_folder_labeled(str(root))


def test_unmatched_stems_are_errors_naming_the_file(tmp_path):
    root = write_folder(tmp_path / "a", {f"s{k}": scene_mask() for k in range(4)})
    Image.fromarray(np.zeros((S, S, 3), np.uint8)).save(root / "images" / "lonely.jpg")
    with pytest.raises(DataError, match=r"lonely\.jpg has no mask"):
        mask_folder_labeled(str(root))
    root = write_folder(tmp_path / "b", {f"s{k}": scene_mask() for k in range(4)})
    Image.fromarray(scene_mask()).save(root / "masks" / "orphan.tif")
    with pytest.raises(DataError, match=r"orphan\.tif has no image"):
        mask_folder_labeled(str(root))


def test_out_of_range_id_and_size_mismatch_are_errors(tmp_path):
    bad = scene_mask()
    bad[1, 1] = 7
    masks = {f"s{k}": scene_mask() for k in range(4)} | {"s4": bad}
    root = write_folder(tmp_path / "a", masks, classes=["background", "field", "building"])
    with pytest.raises(DataError, match=r"s4\.png: mask value 7 .* ids are 0\.\.2"):
        mask_folder_labeled(str(root))
    root = write_folder(tmp_path / "b", {f"s{k}": scene_mask() for k in range(5)})
    Image.fromarray(np.zeros((32, S, 3), np.uint8)).save(root / "images" / "s2.png")
    with pytest.raises(DataError, match=r"masks/s2\.png is 48×48 px but its image .*images/s2"):
        mask_folder_labeled(str(root))


def test_registry_and_inspector(tmp_path, capsys):
    root = write_folder(tmp_path / "d", {f"s{k}": scene_mask(k) for k in range(5)},
                        classes=["background", "field", "building"])
    data = build_eval_dataset("mask_folder", {}, path=str(root), image_size=32, channels=1)
    assert data.train[0]["image"].shape == (1, 32, 32)
    assert len(data.train) + len(data.val) + len(data.test["test"]) == 5
    with pytest.raises(RecipeError, match="finetune.options.bit_depth"):
        build_eval_dataset("mask_folder", {"bit_depth": 11}, path=str(root))
    Image.fromarray(scene_mask()).save(root / "masks" / "extra.png")  # reported, not fatal
    assert cli.main(["data", "inspect", str(root), "--format", "mask_folder"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 5 and report["masks"] == 6
    assert report["unmatched"] == {"images_without_mask": [], "masks_without_image": ["extra"]}
    assert report["classes"] == ["background", "field", "building"]
    # brute force over the written masks: 6 masks, each 120 / 50 / 96 px of ids 1 / 2 / 255
    assert report["pixels"] == {"0": 6 * (S * S - 120 - 50 - 96), "1": 6 * 120, "2": 6 * 50,
                                "255": 6 * 96}
    assert report["splits"]["source"].startswith("seeded")
