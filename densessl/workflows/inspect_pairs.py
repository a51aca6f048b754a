"""``densessl inspect-pairs``: draw augmented pairs with lines between corresponding cells and
their instance boxes, so a person can check that a builder and the augmentation agree."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from densessl.augment.correspondence import normalized_to_pixel  # noqa: E402
from densessl.build import (  # noqa: E402
    backbone_cell_alignment,
    build_augmentation,
    build_pair_builder,
)
from densessl.cells import cell_centres  # noqa: E402
from densessl.io import atomic_write  # noqa: E402
from densessl.pairs import collate_pairs  # noqa: E402
from densessl.recipe import load_recipe  # noqa: E402
from densessl.workflows.data_settings import resolve_data_settings


def _displayable(view: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    image = (view * std[0] + mean[0]).clamp(0, 1)
    if image.shape[0] >= 3:
        image = image[:3]
    else:
        image = image[:1].expand(3, -1, -1)
    return image.permute(1, 2, 0).cpu()


def inspect_pairs(recipe, out: str | Path, overrides: list[str] | None = None, count: int = 4,
                  seed: int = 0, lines_per_pair: int = 24) -> Path:
    recipe = load_recipe(recipe, overrides)
    torch.manual_seed(seed)
    builder = build_pair_builder(recipe)
    resolve_data_settings(recipe, builder)  # augment.mean / std: auto
    stride = recipe.model.dense_stride
    augment = build_augmentation(recipe, grid_stride=stride,
                                 cell_alignment=backbone_cell_alignment(recipe))
    indices = torch.randperm(len(builder))[:count].tolist()
    batch = augment(collate_pairs([builder[i] for i in indices]))
    size = augment.view_size
    cells = size // stride
    centres = cell_centres(cells, cells, stride, alignment=augment.cell_alignment)
    fig, axes = plt.subplots(len(indices), 1, figsize=(6, 3.1 * len(indices)), squeeze=False)
    for row, ax in enumerate(axes[:, 0]):
        a = _displayable(batch.view_a[row], augment.mean, augment.std)
        b = _displayable(batch.view_b[row], augment.mean, augment.std)
        gap = 8
        canvas = torch.ones(size, 2 * size + gap, 3)
        canvas[:, :size], canvas[:, size + gap:] = a, b
        ax.imshow(canvas.numpy())
        valid = batch.valid_ab[row].nonzero()
        pick = valid[torch.randperm(len(valid))[:lines_per_pair]]
        in_b = normalized_to_pixel(batch.grid_ab[row], size, size)
        colours = plt.cm.hsv(torch.linspace(0, 1, max(1, len(pick))).numpy())
        for (i, j), colour in zip(pick.tolist(), colours):
            xa, ya = centres[i, j].tolist()
            xb, yb = in_b[i, j].tolist()
            ax.plot([xa, xb + size + gap], [ya, yb], "-", color=colour, lw=0.8)
            ax.plot([xa, xb + size + gap], [ya, yb], "o", color=colour, ms=2)
        for k in (batch.box_batch == row).nonzero()[:, 0].tolist():
            for boxes, dx in ((batch.boxes_a, 0), (batch.boxes_b, size + gap)):
                x0, y0, x1, y1 = boxes[k].tolist()
                ax.add_patch(plt.Rectangle((x0 + dx, y0), x1 - x0, y1 - y0, fill=False,
                                           color="yellow", lw=1))
        noisy = " (noisy)" if bool(batch.noisy[row]) else ""
        ax.set_title(f"pair {indices[row]}{noisy}: {int(batch.valid_ab[row].sum())} of "
                     f"{cells * cells} cells of A have a match in B", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    path = Path(out)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
