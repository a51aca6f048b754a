"""``densessl data synth xray``: a small synthetic X-ray set in both real on-disk formats.

Writes ``OUT/pidray`` (PIDray layout: COCO JSON with polygon, compressed-RLE and one crowd
uncompressed-RLE mask, an image without annotations, train + easy/hard/hidden test subsets) and
``OUT/sixray`` (SIXray layout: ``JPEGImage/*.jpg``, ``ImageSet/10/{train,test}.csv``, Pascal-VOC
XML boxes for the positives).

Images look like X-ray: a pixel's value is the transmission ``exp(−Σ μ·t)`` through every layer
above it (bag fabric, clothes clutter, cables, items), so overlapping objects darken each other
multiplicatively instead of occluding (Beer–Lambert law). Each of the 12 PIDray classes has its
own silhouette and material, so the classes are learnable.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from densessl.boxes import mask_edge_boxes
from densessl.data.pidray import PIDRAY_CLASSES
from densessl.data.registry import register_synthesizer
from densessl.data.sixray import SIXRAY_CLASSES

#: attenuation per unit thickness in each of three pseudo-colour channels (R, G, B):
#: organic matter absorbs blue most (looks orange), metal absorbs everything (dark blue).
MATERIALS = {
    "organic": np.array([0.35, 0.7, 1.3], dtype=np.float32),
    "mixed": np.array([0.9, 0.6, 1.0], dtype=np.float32),
    "metal": np.array([2.6, 2.2, 1.7], dtype=np.float32),
}


def _rect(u, v, cu, cv, hu, hv):
    return (np.abs(u - cu) <= hu) & (np.abs(v - cv) <= hv)


def _disc(u, v, cu, cv, r):
    return (u - cu) ** 2 + (v - cv) ** 2 <= r**2


def _ring(u, v, cu, cv, r_out, r_in):
    d2 = (u - cu) ** 2 + (v - cv) ** 2
    return (d2 <= r_out**2) & (d2 >= r_in**2)


def _rot(u, v, angle):
    c, s = np.cos(angle), np.sin(angle)
    return c * u + s * v, -s * u + c * v


def _baton(u, v):
    return _rect(u, v, 0, 0, 0.95, 0.08) | _rect(u, v, -0.5, 0.12, 0.05, 0.14)


def _pliers(u, v):
    u1, v1 = _rot(u, v, 0.22)
    u2, v2 = _rot(u, v, -0.22)
    arms = _rect(u1, v1, 0.1, 0, 0.8, 0.06) | _rect(u2, v2, 0.1, 0, 0.8, 0.06)
    return arms | _disc(u, v, 0.35, 0, 0.12)


def _hammer(u, v):
    return _rect(u, v, 0.15, 0, 0.8, 0.07) | _rect(u, v, -0.7, 0, 0.13, 0.42)


def _powerbank(u, v):
    return _rect(u, v, 0, 0, 0.8, 0.45)


def _scissors(u, v):
    rings = _ring(u, v, -0.6, 0.25, 0.22, 0.13) | _ring(u, v, -0.6, -0.25, 0.22, 0.13)
    blades = (u >= -0.4) & (u <= 0.95) & (np.abs(v) <= 0.16 * (0.95 - u) / 1.35 + 0.02)
    return rings | blades


def _wrench(u, v):
    open_end = _ring(u, v, 0.75, 0, 0.27, 0.14) & ~((u > 0.8) & (np.abs(v) < 0.1))
    return _rect(u, v, 0, 0, 0.7, 0.09) | open_end | _ring(u, v, -0.78, 0, 0.22, 0.1)


def _gun(u, v):
    ug, vg = _rot(u + 0.45, v - 0.3, -0.3)
    return (_rect(u, v, 0.15, -0.25, 0.75, 0.14) | _rect(ug, vg, 0, 0, 0.14, 0.38)
            | _ring(u, v, -0.1, 0.02, 0.16, 0.09))


def _bullet(u, v):
    return _rect(u, v, -0.2, 0, 0.55, 0.28) | _disc(u, v, 0.35, 0, 0.28)


def _sprayer(u, v):
    return _rect(u, v, 0, 0.1, 0.32, 0.75) | _rect(u, v, 0, -0.75, 0.12, 0.12)


def _handcuffs(u, v):
    return (_ring(u, v, -0.5, 0, 0.38, 0.27) | _ring(u, v, 0.5, 0, 0.38, 0.27)
            | _rect(u, v, 0, 0, 0.15, 0.05))


def _knife(u, v):
    blade = (u >= -0.1) & (u <= 0.95) & (v <= 0.12) & (v >= -0.12 + 0.24 * (u + 0.1) / 1.05)
    return blade | _rect(u, v, -0.5, 0, 0.4, 0.11)


def _lighter(u, v):
    return _rect(u, v, 0, 0.12, 0.26, 0.55) | _rect(u, v, 0, -0.55, 0.2, 0.15)


#: class name → (shape function of local coordinates u, v in about [−1, 1], material,
#: relative size range of the shape's radius, thickness)
ITEM_SPECS = {
    "Baton": (_baton, "organic", (0.30, 0.42), 1.2),
    "Pliers": (_pliers, "metal", (0.22, 0.32), 0.7),
    "Hammer": (_hammer, "metal", (0.25, 0.35), 0.9),
    "Powerbank": (_powerbank, "mixed", (0.16, 0.24), 1.0),
    "Scissors": (_scissors, "metal", (0.20, 0.30), 0.6),
    "Wrench": (_wrench, "metal", (0.22, 0.32), 0.8),
    "Gun": (_gun, "metal", (0.22, 0.30), 1.0),
    "Bullet": (_bullet, "metal", (0.07, 0.10), 1.2),
    "Sprayer": (_sprayer, "mixed", (0.16, 0.24), 0.8),
    "HandCuffs": (_handcuffs, "metal", (0.18, 0.26), 0.6),
    "Knife": (_knife, "metal", (0.20, 0.30), 0.5),
    "Lighter": (_lighter, "organic", (0.09, 0.13), 1.0),
}


def item_layer(name: str, height: int, width: int, cx: float, cy: float, radius: float,
               angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Render one item: (mask H×W bool, attenuation 3×H×W float32 = μ(material) · thickness).

    A class-specific internal texture (battery cells, a can's thin wall) is folded into the
    thickness so classes with similar outlines still differ inside.
    """
    fn, material, _, thickness = ITEM_SPECS[name]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = _rot((xx - cx) / radius, (yy - cy) / radius, angle)
    mask = fn(u, v)
    profile = np.full((height, width), thickness, dtype=np.float32)
    if name == "Powerbank":
        profile *= 0.7 + 0.3 * (np.cos(u * 12.0) > 0)
    elif name == "Sprayer":
        profile *= 0.5 + 0.8 * (np.abs(u) > 0.22)
    attenuation = MATERIALS[material][:, None, None] * (profile * mask)[None]
    return mask, attenuation.astype(np.float32)


#: test subsets of PIDray: (annotation file stem, image folder, items per image, clutter)
_PIDRAY_TESTS = (("xray_test_easy", "easy", (1, 1), 4), ("xray_test_hard", "hard", (2, 4), 8),
                 ("xray_test_hidden", "hidden", (1, 2), 12))


def _smooth(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    coarse = torch.from_numpy(rng.random((1, 1, cells, cells), dtype=np.float32))
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear",
                                           align_corners=False)[0, 0].numpy()


def render_bag(rng: np.random.Generator, height: int, width: int, clutter: int) -> np.ndarray:
    """Attenuation (3×H×W) of a bag: fabric, handle rails, clothes blobs and cables."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    m = int(0.06 * min(height, width))
    bag = (xx >= m) & (xx < width - m) & (yy >= m) & (yy < height - m)
    thickness = {k: np.zeros((height, width), np.float32) for k in MATERIALS}
    thickness["organic"] += bag * (0.15 + 0.25 * _smooth(rng, height, width, 6))
    rail = (np.abs(xx - m - 2) < 1.5) | (np.abs(xx - (width - m - 3)) < 1.5)
    thickness["metal"] += 0.25 * (rail & bag)
    for _ in range(clutter):
        cx, cy = rng.uniform(m, width - m), rng.uniform(m, height - m)
        rx, ry = rng.uniform(0.08, 0.3, 2) * min(height, width)
        blob = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        kind = "organic" if rng.random() < 0.75 else "mixed"
        thickness[kind] += blob * bag * rng.uniform(0.2, 0.6) * (
            0.6 + 0.4 * _smooth(rng, height, width, 10))
    for _ in range(rng.integers(0, 3)):
        x0, y0, x1, y1 = rng.uniform(0, 1, 4) * [width, height, width, height]
        t = np.clip(((xx - x0) * (x1 - x0) + (yy - y0) * (y1 - y0))
                    / max((x1 - x0) ** 2 + (y1 - y0) ** 2, 1e-6), 0, 1)
        dist = np.hypot(xx - x0 - t * (x1 - x0), yy - y0 - t * (y1 - y0))
        thickness["metal"] += 0.3 * (dist < 0.8) * bag
    return sum(MATERIALS[k][:, None, None] * thickness[k][None] for k in MATERIALS)


def place_item(rng: np.random.Generator, name: str, height: int, width: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """One item of class ``name`` at a random place, size and angle inside the bag."""
    lo, hi = ITEM_SPECS[name][2]
    radius = float(rng.uniform(lo, hi)) * min(height, width)
    margin = 0.1 * min(height, width) + 0.5 * radius
    cx = rng.uniform(margin, width - margin)
    cy = rng.uniform(margin, height - margin)
    return item_layer(name, height, width, cx, cy, radius, float(rng.uniform(0, 2 * np.pi)))


def to_transmission(rng: np.random.Generator, attenuation: np.ndarray) -> np.ndarray:
    """Beer–Lambert transmission plus a little detector noise → H×W×3 uint8."""
    image = np.exp(-attenuation) + rng.normal(0, 0.01, attenuation.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (column-major run lengths starting with a run of zeros)."""
    flat = np.asfortranarray(mask.astype(np.uint8)).reshape(-1, order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def encode_segmentation(mask: np.ndarray, style: str) -> list | dict | None:
    """``mask`` as COCO polygons, compressed RLE or uncompressed RLE (None if no polygon)."""
    if style == "polygon":
        import cv2

        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        polygons = [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]
        return polygons or None
    if style == "rle":
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    return uncompressed_rle(mask)


def _annotation(segmentation, height, width, ann_id, image_id, category_id, crowd=False):
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}
    return {"id": ann_id, "image_id": image_id, "category_id": category_id,
            "segmentation": segmentation, "area": float(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": int(crowd)}


def write_pidray_split(root: Path, json_name: str, folder: str, count: int, seed: int,
                       items: tuple[int, int], clutter: int, specials: bool,
                       size: int = 128) -> None:
    """One PIDray split: PNG images under ``root/folder`` and ``annotations/json_name``
    (``size`` px high, 1 to 1.25 × as wide).

    With ``specials`` image 0 has no annotations and image 1 gets a crowd of bullets.
    """
    rng = np.random.default_rng(seed)
    (root / folder).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        height, width = _bag_size(rng, size)
        attenuation = render_bag(rng, height, width, clutter)
        n_items = 0 if specials and i == 0 else int(rng.integers(items[0], items[1] + 1))
        for _ in range(n_items):
            class_id = int(rng.integers(len(PIDRAY_CLASSES))) + 1
            mask, att = place_item(rng, PIDRAY_CLASSES[class_id - 1], height, width)
            attenuation = attenuation + att
            style = "polygon" if len(annotations) % 2 == 0 else "rle"
            segmentation = encode_segmentation(mask, style)
            if segmentation is not None:
                annotations.append(_annotation(segmentation, height, width,
                                               len(annotations) + 1, i + 1, class_id))
        if specials and i == 1:
            crowd = np.zeros((height, width), bool)
            for _ in range(3):
                mask, att = place_item(rng, "Bullet", height, width)
                crowd |= mask
                attenuation = attenuation + att
            annotations.append(_annotation(uncompressed_rle(crowd), height, width,
                                           len(annotations) + 1, i + 1,
                                           PIDRAY_CLASSES.index("Bullet") + 1, crowd=True))
        name = f"xray_{folder}_{i:05d}.png"
        Image.fromarray(to_transmission(rng, attenuation)).save(root / folder / name)
        images.append({"id": i + 1, "file_name": name, "height": height, "width": width})
    coco = {"info": {"description": "densessl synthetic PIDray-style X-ray set"},
            "licenses": [], "images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n, "supercategory": "prohibited"}
                           for i, n in enumerate(PIDRAY_CLASSES)]}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / json_name).write_text(json.dumps(coco))


def _voc_xml(name: str, height: int, width: int, objects: list[tuple[str, list[int]]]) -> str:
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = "JPEGImage"
    ET.SubElement(ann, "filename").text = f"{name}.jpg"
    size = ET.SubElement(ann, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    for cls, (x0, y0, x1, y1) in objects:
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = cls.lower()
        ET.SubElement(obj, "difficult").text = "0"
        box = ET.SubElement(obj, "bndbox")
        for tag, value in (("xmin", x0), ("ymin", y0), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(box, tag).text = str(value)
    return ET.tostring(ann, encoding="unicode")


def write_sixray(root: Path, count: int, seed: int, subset: str = "10", size: int = 128) -> None:
    """SIXray layout: one positive in four, the rest negatives (empty bags)."""
    rng = np.random.default_rng(seed)
    for sub in ("JPEGImage", f"ImageSet/{subset}", "positive-Annotation/Annotation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        height, width = _bag_size(rng, size)
        attenuation = render_bag(rng, height, width, clutter=int(rng.integers(4, 10)))
        positive = i % 4 == 0
        name = f"P{i:05d}" if positive else f"N{i:06d}"
        present, objects = set(), []
        for _ in range(int(rng.integers(1, 3)) if positive else 0):
            cls = SIXRAY_CLASSES[int(rng.integers(len(SIXRAY_CLASSES)))]
            mask, att = place_item(rng, cls, height, width)
            attenuation = attenuation + att
            x0, y0, x1, y1 = mask_edge_boxes(torch.from_numpy(mask)[None])[0].int().tolist()
            # VOC boxes are 1-based and inclusive: the first pixel + 1, the COCO far edge
            objects.append((cls, [x0 + 1, y0 + 1, x1, y1]))
            present.add(cls)
        Image.fromarray(to_transmission(rng, attenuation)).save(
            root / "JPEGImage" / f"{name}.jpg", quality=92)
        if objects:
            (root / "positive-Annotation" / "Annotation" / f"{name}.xml").write_text(
                _voc_xml(name, height, width, objects))
        rows.append(",".join([name] + ["1" if c in present else "-1" for c in SIXRAY_CLASSES]))
    header = "name," + ",".join(SIXRAY_CLASSES)
    cut = int(0.8 * count)
    for split, part in (("train", rows[:cut]), ("test", rows[cut:])):
        (root / "ImageSet" / subset / f"{split}.csv").write_text(
            "\n".join([header] + part) + "\n")


def _bag_size(rng: np.random.Generator, size: int) -> tuple[int, int]:
    """(height, width): ``size`` high, 1, 9/8 or 5/4 × as wide (128 → 128, 144 or 160)."""
    return size, int(rng.choice([size, size * 9 // 8, size * 5 // 4]))


@register_synthesizer("xray")
def synthesize_xray(out: Path, n: int | None = None, seed: int = 0, size: int = 128) -> Path:
    """Write ``out/pidray`` (``n`` train images, default 48) and ``out/sixray`` (``n`` images),
    ``size`` px high (real PIDray / SIXray images are larger than the default 128)."""
    out = Path(out)
    n = 48 if n is None else int(n)
    if n < 2:
        raise ValueError(f"data synth xray: --n must be at least 2, got {n}")
    pidray = out / "pidray"
    write_pidray_split(pidray, "xray_train.json", "train", n, seed * 7919 + 1, (1, 3), 6, True,
                       size)
    for k, (stem, folder, items, clutter) in enumerate(_PIDRAY_TESTS):
        write_pidray_split(pidray, f"{stem}.json", folder, max(4, n // 8),
                           seed * 7919 + 2 + k, items, clutter, False, size)
    write_sixray(out / "sixray", n, seed * 7919 + 5, size=size)
    return out
