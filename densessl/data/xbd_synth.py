"""Synthetic xBD / xView2 sets in the real on-disk format (``densessl data synth xbd``).

Writes ``<out>/train/images/<disaster>_<8 digits>_{pre,post}_disaster.png``, the label JSON of
each image (``features.lng_lat`` and ``features.xy`` with WKT polygons, ``metadata``) and the
``targets/<stem>_target.png`` rasters, like the real release. Buildings are rotated rectangles
on smooth terrain; in the post image each building's look depends on its damage class, and the
whole scene gets another illumination (a different acquisition date).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from shapely.affinity import rotate
from shapely.geometry import Polygon, box

from densessl.data.rasterize import rasterize_shapes
from densessl.data.registry import register_synthesizer
from densessl.data.synthetic import smooth_noise

DAMAGE_CLASSES = ("no-damage", "minor-damage", "major-damage", "destroyed")
DISASTERS = (("synthetic-flood", "flooding"), ("synthetic-wildfire", "fire"))
_LNG0, _LAT0, _DEG_PER_PX = -95.36, 29.76, 0.0000045  # ~0.5 m pixels near Houston


def _buildings(rng: np.random.Generator, size: int, count: int) -> list[Polygon]:
    placed: list[Polygon] = []
    for _ in range(count * 10):
        if len(placed) == count:
            break
        w, h = rng.uniform(0.06, 0.14, 2) * size
        x, y = rng.uniform(0.05 * size, 0.95 * size - max(w, h), 2)
        poly = rotate(box(x, y, x + w, y + h), float(rng.uniform(0, 90)), origin="centroid")
        if all(poly.distance(p) > 2 for p in placed):
            placed.append(poly)
    return placed


def _wkt(poly: Polygon, to_lnglat: bool) -> str:
    coords = np.asarray(poly.exterior.coords)
    if to_lnglat:
        coords = np.stack([_LNG0 + coords[:, 0] * _DEG_PER_PX,
                           _LAT0 - coords[:, 1] * _DEG_PER_PX], axis=1)
    return Polygon(coords).wkt


def _label(polys, subtypes, uids, meta: dict) -> dict:
    def features(lnglat: bool):
        out = []
        for poly, subtype, uid in zip(polys, subtypes, uids):
            props = {"feature_type": "building", "uid": uid}
            if subtype is not None:
                props["subtype"] = subtype
            out.append({"properties": props, "wkt": _wkt(poly, lnglat)})
        return out

    return {"features": {"lng_lat": features(True), "xy": features(False)}, "metadata": meta}


def _render(rng, size, polys, damage, post: bool) -> np.ndarray:
    """H×W×3 uint8. ``damage`` holds 0..3 (class index) or -1 (un-classified) per building."""
    terrain = 0.25 + 0.35 * smooth_noise(rng, size, 3, cells=6)
    terrain *= np.array([0.8, 1.0, 0.6], dtype=np.float32)[:, None, None]  # vegetation tint
    image = terrain + 0.08 * (smooth_noise(rng, size, 3, cells=32) - 0.5)
    ids = rasterize_shapes([(p, i + 1) for i, p in enumerate(polys)], size, size,
                           dtype=np.int32)
    yy, xx = np.mgrid[0:size, 0:size]
    for i, _ in enumerate(polys):
        where = ids == i + 1
        roof = np.array([0.75, 0.72, 0.7]) if i % 2 else np.array([0.65, 0.35, 0.3])
        image[:, where] = roof[:, None]
        level = damage[i]
        if post and level >= 1:
            # Damage shows as rubble speckle whose extent and darkness grow with the class.
            speckle = rng.random(where.sum()) < (0.25, 0.6, 0.95)[level - 1]
            rubble = np.array([0.35, 0.3, 0.25]) * (1.0 - 0.15 * level)
            pix = np.flatnonzero(where.ravel())[speckle]
            image.reshape(3, -1)[:, pix] = rubble[:, None]
            if level == 3:  # destroyed: scorched stripes, the roof outline is gone
                stripes = (np.sin((xx + yy) * 0.9) > 0)[where]
                image.reshape(3, -1)[:, np.flatnonzero(where.ravel())[stripes]] = 0.12
    if post:  # another date: other sun angle / atmosphere
        image = image * rng.uniform(0.85, 1.1, (3, 1, 1)) + rng.uniform(-0.04, 0.04)
    return (np.clip(image, 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)


def write_xbd_pair(root: Path, split: str, disaster: str, disaster_type: str, number: int,
                   rng: np.random.Generator, size: int = 128, buildings: int = 8,
                   targets: bool = True) -> str:
    """Write one pre/post pair with labels (and targets); returns the shared id stem."""
    polys = _buildings(rng, size, buildings)
    damage = [int(d) if rng.random() > 0.1 else -1
              for d in rng.integers(0, 4, len(polys))]
    uids = [f"{rng.integers(1 << 62):016x}{rng.integers(1 << 62):016x}" for _ in polys]
    base = f"{disaster}_{number:08d}"
    for folder in ("images", "labels") + (("targets",) if targets else ()):
        (root / split / folder).mkdir(parents=True, exist_ok=True)
    scene_seed = int(rng.integers(1 << 31))
    for phase in ("pre", "post"):
        stem = f"{base}_{phase}_disaster"
        post = phase == "post"
        # Same seed for both dates: identical terrain, only the post-disaster changes differ.
        image = _render(np.random.default_rng(scene_seed), size, polys, damage, post)
        Image.fromarray(image).save(root / split / "images" / f"{stem}.png")
        subtypes = ([DAMAGE_CLASSES[d] if d >= 0 else "un-classified" for d in damage]
                    if post else [None] * len(polys))
        meta = {"sensor": "SYNTHETIC", "provider_asset_type": "SYNTHETIC", "gsd": 0.5,
                "capture_date": "2017-08-20T17:00:00.000Z" if not post
                else "2017-09-02T17:00:00.000Z", "disaster": disaster,
                "disaster_type": disaster_type, "img_name": f"{stem}.png", "width": size,
                "height": size, "id": f"{base}_{phase}"}
        (root / split / "labels" / f"{stem}.json").write_text(
            json.dumps(_label(polys, subtypes, uids, meta)))
        if targets:
            values = [1 if not post else (d + 1 if d >= 0 else 255) for d in damage]
            order = sorted(range(len(polys)), key=lambda i: values[i] % 255)
            target = rasterize_shapes([(polys[i], values[i]) for i in order], size, size)
            Image.fromarray(target).save(root / split / "targets" / f"{stem}_target.png")
    return base


@register_synthesizer("xbd")
def synthesize_xbd(out: Path, n: int | None = None, seed: int = 0, size: int = 128) -> Path:
    """``n`` pre/post pairs (default 8) split over two synthetic disasters under ``out``."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    for i in range(n or 8):
        disaster, kind = DISASTERS[i % len(DISASTERS)]
        write_xbd_pair(out, "train", disaster, kind, i, rng, size=size)
    return out
