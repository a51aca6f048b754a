"""Built-in synthetic imagery: deterministic scenes of textured shapes, no data on disk needed.

Each image is a smooth random background with a few shapes (discs, boxes, triangles, rings) of
per-channel colours and stripe textures. Index ``i`` with seed ``s`` always gives the same image,
in any worker, so runs are reproducible. Enough structure for dense features to be learnable, and
any channel count (``channels`` > 3 mimics multispectral imagery).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from densessl.data.registry import register_source

SHAPES = ("disc", "box", "triangle", "ring")


def smooth_noise(rng: np.random.Generator, size: int, channels: int, cells: int) -> np.ndarray:
    """Low-frequency noise: a coarse random grid upsampled bilinearly (C×size×size)."""
    coarse = torch.from_numpy(rng.random((1, channels, cells, cells), dtype=np.float32))
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear",
                                           align_corners=False)
    return fine[0].numpy()


def shape_mask(kind: str, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Boolean mask of one shape centred at (cx, cy) with radius r, rotated by angle."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    if kind == "disc":
        return u**2 + v**2 <= r**2
    if kind == "ring":
        d2 = u**2 + v**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if kind == "box":
        return (np.abs(u) <= r) & (np.abs(v) <= 0.6 * r)
    if kind == "triangle":
        return (v <= 0.5 * r) & (v >= -r + 1.7 * np.abs(u))
    raise ValueError(f"unknown shape kind {kind!r}; expected one of {SHAPES}")


def render_scene(rng: np.random.Generator, size: int, channels: int,
                 num_shapes: tuple[int, int] = (3, 7)) -> tuple[np.ndarray, np.ndarray]:
    """Render one scene. Returns (image C×H×W float32 in [0,1], label map H×W int64, 0 = bg)."""
    image = 0.25 + 0.5 * smooth_noise(rng, size, channels, cells=4)
    image += 0.15 * (smooth_noise(rng, size, channels, cells=16) - 0.5)
    labels = np.zeros((size, size), dtype=np.int64)
    for _ in range(rng.integers(num_shapes[0], num_shapes[1] + 1)):
        kind_idx = int(rng.integers(len(SHAPES)))
        r = float(rng.uniform(0.08, 0.22) * size)
        cx, cy = rng.uniform(0, size, 2)
        mask = shape_mask(SHAPES[kind_idx], size, cx, cy, r, float(rng.uniform(0, np.pi)))
        colour = rng.uniform(0.0, 1.0, channels).astype(np.float32)
        # A class-specific stripe texture makes the shape kind visible from local appearance.
        yy, xx = np.mgrid[0:size, 0:size]
        stripes = 0.5 + 0.5 * np.sin((xx * (kind_idx + 1) + yy * (3 - kind_idx)) * 0.6)
        texture = colour[:, None, None] * (0.75 + 0.25 * stripes[None].astype(np.float32))
        image[:, mask] = texture[:, mask]
        labels[mask] = kind_idx + 1
    return np.clip(image, 0.0, 1.0).astype(np.float32), labels


@register_source("synthetic")
class SyntheticScenes(Dataset):
    """Deterministic synthetic images: ``{"image": C×H×W float, "mask": H×W long}``.

    Args:
        num_images: dataset length.
        image_size: side of the square images.
        channels: number of bands.
        seed: base seed; image i uses ``seed * 1_000_003 + i``.
    """

    num_classes = len(SHAPES) + 1

    def __init__(self, num_images: int = 256, image_size: int = 96, channels: int = 3,
                 seed: int = 0) -> None:  # noqa: D107
        if num_images < 1 or image_size < 8 or channels < 1:
            raise ValueError("SyntheticScenes needs num_images >= 1, image_size >= 8, "
                             f"channels >= 1; got {num_images}, {image_size}, {channels}")
        self.num_images, self.image_size, self.channels, self.seed = (
            num_images, image_size, channels, seed)

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        rng = np.random.default_rng(self.seed * 1_000_003 + index)
        image, labels = render_scene(rng, self.image_size, self.channels)
        return {"image": torch.from_numpy(image), "mask": torch.from_numpy(labels),
                "meta": {"source": "synthetic", "index": index, "seed": self.seed}}
