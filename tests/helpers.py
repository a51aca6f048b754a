"""Helpers shared by the tests (plain functions; the fixtures are in tests/conftest.py).

``from helpers import ...`` works from any test module: pytest puts ``tests/`` on ``sys.path``
(rootdir-relative "prepend" imports, no ``__init__.py``).

* :func:`identity_grid`: where the cells of a stride-s feature map sit in their own image, in
  ``grid_sample(align_corners=False)`` coordinates (view B's key at a cell is that cell).
* the colour-correspondence harness: :func:`coordinate_image` paints every pixel with its own
  (x, y) — a unique, linearly interpolable colour — and :func:`colours_agree` checks, at the
  cell centres of view A, that view B shows the same colour at ``grid_ab``.
* the painted cut-paste harness: :func:`painted_segment`, :func:`painted_background`,
  :func:`painted_builder` (a CutPastePairs over them) and :func:`painted_colours_agree`.
* :func:`field_centroids`: where a feature cell looks in its image (gradient centroid).
* :func:`pair_batch`: one augmented PairBatch of a recipe, optionally with random boxes and
  class maps (so the instance objective has work to do).
* :func:`small_xray_pretrain_args`: ``densessl pretrain`` of the X-ray SegLoc recipe at a
  size a test can afford.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from densessl.augment.correspondence import pixel_to_normalized
from densessl.cells import cell_centres
from densessl.contract import PairSample
from densessl.pairs import CutPastePairs, PairBuilder


def identity_grid(b: int, h: int, w: int, stride: int = 8) -> torch.Tensor:
    """B×h×w×2 (x, y): cell (i, j) of an h×w stride-s map at pixel (s·j, s·i) of its
    (s·h)×(s·w) image, as a torchvision ResNet places it (``stride=1``: the pixel centres)."""
    ys = (2 * stride * torch.arange(h) + 1) / (stride * h) - 1
    xs = (2 * stride * torch.arange(w) + 1) / (stride * w) - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # h×w×2 as (x, y)
    return grid[None].repeat(b, 1, 1, 1)


def coordinate_image(height: int = 64, width: int | None = None, channels: int = 3,
                     scale: float | None = None, code: float = 1.0) -> torch.Tensor:
    """C×H×W: channel 0 = x / scale, channel 1 = y / scale (``scale`` defaults to the width and
    the height), every further channel = ``code`` (1: "this pixel came from the source")."""
    width = height if width is None else width
    ys, xs = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(),
                            indexing="ij")
    planes = [xs / (scale or width), ys / (scale or height)]
    planes += [torch.full((height, width), float(code))] * (channels - 2)
    return torch.stack(planes)


def cell_colours(pair, view: int, cells: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """(colour of view A at its ``cells``×``cells`` cell centres, colour of view B at
    ``pair.grid_ab``), each B×C×cells×cells."""
    centres = pixel_to_normalized(cell_centres(cells, cells, view / cells), view, view)
    b = pair.view_a.shape[0]
    colour_a = F.grid_sample(pair.view_a, centres[None].expand(b, -1, -1, -1),
                             align_corners=False, padding_mode="border")
    colour_b = F.grid_sample(pair.view_b, pair.grid_ab, align_corners=False,
                             padding_mode="border")
    return colour_a, colour_b


def colours_agree(pair, view: int, cells: int = 12, size: float = 64,
                  code_tol: float | None = None, max_px: float = 0.5
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(colour_a B×C×h×w, agree B×h×w)`` for views of :func:`coordinate_image`-painted
    sources (channels 0/1 = x/y over ``size``): ``agree`` where view B at ``grid_ab`` shows the
    same source point as view A's cell (within ``max_px`` source pixels) and, with
    ``code_tol``, the same code in channel 2 (a segment / background id)."""
    colour_a, colour_b = cell_colours(pair, view, cells)
    error_px = (colour_a[:, :2] - colour_b[:, :2]).abs().amax(1) * size
    agree = error_px < max_px
    if code_tol is not None:
        agree &= (colour_a[:, 2] - colour_b[:, 2]).abs() < code_tol
    return colour_a, agree


#: side of the painted cut-paste sources (:func:`painted_builder`)
PAINTED_SIZE = 64


def painted_segment(h, w, label):
    """A segment painted with its own coordinates (over PAINTED_SIZE) and 0.1 × ``label``, with
    an elliptic mask (so the mask, not the crop, matters)."""
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    image = torch.stack([xs / PAINTED_SIZE, ys / PAINTED_SIZE, torch.full((h, w), 0.1 * label)])
    yy, xx = (ys - (h - 1) / 2) / (h / 2), (xs - (w - 1) / 2) / (w / 2)
    mask = yy**2 + xx**2 <= 1.0
    return {"image": image, "mask": mask, "label": label, "source_size": PAINTED_SIZE}


def painted_background(code):
    """A background painted with its position and ``code`` (its id)."""
    return {"image": coordinate_image(PAINTED_SIZE, code=code)}


def painted_colours_agree(pair, view: int):
    """Colours of the painted sources (channels 0/1: source x/y over PAINTED_SIZE, channel 2:
    0.1 × label) at view A's cell centres, and where view B at ``grid_ab`` shows the same
    source point (within half a pixel) of the same segment: ``(colour_a B×3×h×w, agree
    B×h×w)``."""
    return colours_agree(pair, view, cells=12, size=PAINTED_SIZE, code_tol=0.01)


def painted_builder(mode="segloc", same_background=0.5, k=3):
    """CutPastePairs over four painted segments and three painted backgrounds."""
    segments = [painted_segment(h, w, i + 1)
                for i, (h, w) in enumerate([(20, 34), (26, 26), (16, 30), (30, 18)])]
    backgrounds = [painted_background(c) for c in (0.7, 0.8, 0.9)]
    return CutPastePairs(mode=mode, k=k, blend="alpha", scale_range=(1.0, 1.8),
                         same_background=same_background, image_size=PAINTED_SIZE,
                         segments=segments, backgrounds=backgrounds, num_pairs=32)


def field_centroids(forward, images: torch.Tensor, cells: list[tuple[int, int]]) -> torch.Tensor:
    """(x, y) centroid of |d feature(cell) / d image| for image b and cells[b] → B×2."""
    images = images.clone().requires_grad_(True)
    out = forward(images)
    torch.stack([out[b, :, i, j].sum() for b, (i, j) in enumerate(cells)]).sum().backward()
    weight = images.grad.abs().sum(1)
    weight = weight / weight.sum((1, 2), keepdim=True)
    ys = torch.arange(images.shape[-2], dtype=torch.float64)
    xs = torch.arange(images.shape[-1], dtype=torch.float64)
    cy = (weight.double().sum(2) * ys).sum(1)
    cx = (weight.double().sum(1) * xs).sum(1)
    return torch.stack([cx, cy], 1)


#: class ids of :func:`pair_batch`'s random boxes and class maps: 0 .. PAIR_BATCH_CLASSES − 1
PAIR_BATCH_CLASSES = 12


def pair_batch(recipe, device: torch.device, with_instances: bool = False):
    """One augmented PairBatch of ``recipe``'s builder and view augmentation on ``device``
    (``train.batch_size`` pairs). ``with_instances``: 4 random boxes per image (the same
    instances in B, moved and shrunk), random labels and a random class map (−1 included),
    seeded, with classes 0 .. PAIR_BATCH_CLASSES − 1."""
    from densessl.build import backbone_cell_alignment, build_augmentation, build_pair_builder
    from densessl.contract import add_random_instances
    from densessl.pairs import collate_pairs

    builder = build_pair_builder(recipe)
    source = collate_pairs([builder[i] for i in range(recipe.train.batch_size)]).to(device)
    augment = build_augmentation(recipe, recipe.model.dense_stride,
                                 cell_alignment=backbone_cell_alignment(recipe)).to(device)
    batch = augment(source)
    if with_instances:
        add_random_instances(batch, recipe.augment.view_size, PAIR_BATCH_CLASSES)
    return batch


def small_xray_pretrain_args(out: Path, cache: Path, *settings: str) -> list[str]:
    """CLI arguments for ``densessl pretrain`` of ``recipes/xray_segloc.yaml`` into ``out`` on
    the synthetic X-ray set (generated into ``cache``): 96-px sources, 64-px views (with
    ``background: ignore`` only the segments' cells count, and a view needs a few cells per
    segment: at 48-px views none survives), no worker processes; ``settings`` (``key=value``)
    come after these."""
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "xray_segloc.yaml"
    every = ["train.num_workers=0", "data.image_size=96", "augment.view_size=64",
             f"pairs.options.cache_dir={cache}", *settings]
    return ["pretrain", str(recipe), "--out", str(out),
            *[arg for setting in every for arg in ("--set", setting)]]


#: shipped recipes that read only the user's data and so cannot load without a path
USER_DATA_PATH = "/data/your/images"


def load_shipped_recipe(path: Path, overrides: list[str] | None = None):
    """A shipped recipe as a user loads it: the ones whose data source reads only the user's
    files (``own_xray_coco``: ``data.source: folder``) get a ``data.path``, as the README's
    command gives them."""
    from densessl.recipe import load_recipe, read_recipe_dict

    needs_path = (read_recipe_dict(path).get("data") or {}).get("source") == "folder"
    return load_recipe(path, [f"data.path={USER_DATA_PATH}"] * needs_path + (overrides or []))


def check_noise_mask_on_view_cells(batch, truth: list, channels: int, size: int):
    """Augment ``batch`` (a collated SourceBatch with ``noise_mask_a``) with a rotating,
    flipping 32-px view augmentation (grid stride 4: 8×8 cells) and check the view's
    ``noise_mask_a`` cell by cell against the reference: each cell centre taken back through
    view A's transform to its nearest source-A pixel, looked up in ``truth[b]`` (H×W bool, the
    source's size ``size``). Cells on a pixel edge (a tie) are skipped. Returns (the PairBatch,
    how many cells were checked)."""
    from densessl.augment import ViewAugmentation
    from densessl.augment.correspondence import apply_homography
    from densessl.cells import cell_centres

    augment = ViewAugmentation(channels, view_size=32, grid_stride=4,
                               geometry=dict(crop_scale=(0.3, 1.0), hflip=0.5,
                                             rotation_degrees=30, rotation_p=1.0),
                               photometry=None, mean=0.0, std=1.0)
    torch.manual_seed(0)
    pair = augment(batch)
    assert pair.noise_mask_a.shape == pair.valid_ab.shape
    n = len(truth)
    centres = cell_centres(8, 8, 4.0).expand(n, -1, -1, -1).double()
    src = apply_homography(torch.linalg.inv(pair.matrix_a.double()), centres)
    checked = 0
    for b in range(n):
        for i in range(8):
            for j in range(8):
                x, y = src[b, i, j].tolist()
                if min(abs(x - round(x)), abs(y - round(y))) > 0.5 - 1e-3:
                    continue  # on a pixel edge: nearest is a tie
                xi, yi = int(round(x)), int(round(y))
                want = 0 <= xi < size and 0 <= yi < size and bool(truth[b][yi, xi])
                assert bool(pair.noise_mask_a[b, i, j]) == want
                checked += 1
    return pair, checked


#: UniquePixels' source size
UNIQUE_H = UNIQUE_W = 32


class UniquePixels(PairBuilder):
    """Sample i: every pixel of every sample has a distinct value; B = A (identity)."""

    def __init__(self, n: int = 50, instances: bool = False):
        self.n, self.instances = n, instances

    def __len__(self):
        return self.n

    def build(self, index):
        values = torch.arange(UNIQUE_H * UNIQUE_W, dtype=torch.float32)
        values = values.reshape(1, UNIQUE_H, UNIQUE_W)
        image = (values + index * UNIQUE_H * UNIQUE_W).repeat(2, 1, 1)
        image[1] = -1.0  # channel 1 carries the instance class colour
        if not self.instances:
            return PairSample(source_a=image, source_b=image.clone())
        label = index % 3
        box = torch.tensor([[4.0, 4.0, 20.0, 20.0]])
        image[1, 4:20, 4:20] = label
        return PairSample(source_a=image, source_b=image.clone(), boxes_a=box, boxes_b=box,
                          instance_ids=torch.tensor([0]), labels=torch.tensor([label]))


#: shrink any walkthrough to seconds: the data, the model's budget, one seed
WALKTHROUGH_TINY = ["train.max_steps=2", "train.batch_size=4", "train.num_workers=0",
        "model.split_bn_groups=2", "data.image_size=64", "augment.view_size=48",
        "finetune.image_size=64", "finetune.seeds=[0]", "finetune.steps=4",
        "finetune.detection_steps=2", "finetune.supervised_steps=2", "finetune.probe_steps=30",
        "finetune.batch_size=4", "loss.dense.queue_size=64", "loss.global.queue_size=64"]


def set_args(*items: str) -> list[str]:
    """``--set`` before each ``key=value``, for the CLI."""
    return [arg for item in items for arg in ("--set", item)]


def identity_pair_batch(class_map: torch.Tensor, valid: torch.Tensor | None = None,
                        boxes_per_image: int = 0, stride: int = 8):
    """A PairBatch with identity correspondence on ``class_map``'s H×H grid (B×H×H, −1 = the
    bag): random 3-channel views of H·``stride`` px, ``boxes_per_image`` fixed boxes per
    image, nothing noisy."""
    from densessl.contract import PairBatch

    b, h = class_map.shape[0], class_map.shape[1]
    centres = (torch.arange(h) + 0.5) / h * 2 - 1
    gy, gx = torch.meshgrid(centres, centres, indexing="ij")
    grid = torch.stack([gx, gy], dim=-1).expand(b, h, h, 2).clone()
    n = b * boxes_per_image
    boxes = torch.tensor([[8.0, 8.0, 40.0, 40.0]]).repeat(n, 1) + torch.arange(n)[:, None] % 3
    return PairBatch(
        view_a=torch.randn(b, 3, h * stride, h * stride),
        view_b=torch.randn(b, 3, h * stride, h * stride),
        grid_ab=grid, valid_ab=torch.ones(b, h, h, dtype=torch.bool) if valid is None else valid,
        boxes_a=boxes, boxes_b=boxes.clone(),
        box_batch=torch.arange(b).repeat_interleave(boxes_per_image),
        box_label=torch.full((n,), -1, dtype=torch.long), instance_ids=torch.arange(n),
        class_map_a=class_map, noisy=torch.zeros(b, dtype=torch.bool),
        matrix_a=torch.eye(3).expand(b, 3, 3), matrix_b=torch.eye(3).expand(b, 3, 3))


def make_sync_free(task):
    """Set every module's ``sync_free`` (what a GPU run picks by itself); returns ``task``."""
    for module in task.modules():
        if hasattr(module, "sync_free"):
            module.sync_free = True
    return task


def fake_step(task, batch) -> None:
    """One momentum update, loss and backward under FakeTensorMode: any op that reads a
    tensor value on the host raises."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        task.model.update(0.99)
        loss, _ = task.compute_losses(batch)
        loss.backward()


def robust_monitor_host(loss_fn):
    """What DensePretraining.robust_detection reads of the task, with fresh run totals."""
    from types import SimpleNamespace

    from densessl.methods.monitors import RANK_BINS

    return SimpleNamespace(dense_loss=loss_fn, training=True, robust_counts=torch.zeros(6),
                           robust_rank_hist=torch.zeros(2, RANK_BINS),
                           robust_rank_sums=torch.zeros(2))


def randomise_bn(module):
    """Non-trivial BatchNorm statistics, so a buffer that was not loaded shows; returns
    ``module``."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return module
