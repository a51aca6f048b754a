"""Pixel-level contrast over exactly corresponding cells, with a MoCo queue (one, or one per
class as in SegLoc).

Like DenseCL (Wang et al. 2021) and PixPro (Xie et al. 2021), but positives come from the known
correspondence ``grid_ab`` of the pair (no feature matching, no distance threshold), which also
works for temporal and cut-paste pairs.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from densessl.cells import CELL_ALIGNMENTS, image_to_feature_grid
from densessl.distributed import gather_concat, rank, world_size
from densessl.losses.functional import pairwise_negatives, ring_negatives, weighted_info_nce
from densessl.losses.per_class_queue import PerClassQueue
from densessl.losses.queue import MoCoQueue
from densessl.losses.robust import RobustPositives


def sample_cells(valid: Tensor, per_image: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pick up to ``per_image`` distinct random valid cells of each image, in fixed shapes.

    Shapes never depend on how many cells are valid (a GPU step must not wait to learn a
    count): every image gets ``n = min(per_image, L)`` slots, and ``keep`` marks the slots that
    hold a valid cell.

    Args:
        valid: ``B×L`` bool (``L = h·w`` flattened cells).
        per_image: maximum cells per image.

    Returns:
        ``(image, cell, keep)``, each of length ``B·n``, image-major (slot ``i·n + j`` is the
        j-th pick of image i); cells of an image in increasing order.
    """
    b, length = valid.shape
    n = max(min(per_image, length), 0)
    # random scores in [0, 1) for valid cells, −1 for invalid: top-n is a uniform sample of
    # the valid ones, done for the whole batch at once
    scores = torch.rand(valid.shape, device=valid.device).masked_fill(~valid, -1.0)
    top = scores.topk(n, dim=1)
    # sorted by cell index: when every valid cell is taken the result is deterministic, so one
    # process and several processes on the same global batch fill queues identically
    cells, order = top.indices.sort(dim=1)
    keep = top.values.gather(1, order) >= 0
    image = torch.arange(b, device=valid.device)[:, None].expand(b, n)
    return image.reshape(-1), cells.reshape(-1), keep.reshape(-1)


def cells_of(dense: Tensor, cell: Tensor) -> Tensor:
    """Feature vectors of ``n`` cells per image: ``dense`` B×D×h×w (or B×D×L), ``cell`` B·n
    (image-major, as :func:`sample_cells`) → B·n×D."""
    b, d = dense.shape[:2]
    index = cell.reshape(b, 1, -1).expand(b, d, -1)
    return dense.flatten(2).gather(2, index).transpose(1, 2).reshape(-1, d)


def keys_at(k_dense: Tensor, grid_ab: Tensor, cell: Tensor, stride: int,
            alignment: str = "centre") -> Tensor:
    """View-B features at the points of the chosen view-A cells: bilinear at ``grid_ab``, only
    where needed → B·n×D.

    ``grid_ab`` is in view-B image coordinates; ``k_dense`` is view B's stride-``stride`` map,
    whose cells sit where :mod:`densessl.cells` says for ``alignment`` (the encoder's
    ``cell_alignment``). Border padding: a point inside view B but past its outermost cell
    centre takes the edge cell's feature instead of being blended with zeros.
    """
    b, d, fh, fw = k_dense.shape
    grid = grid_ab.reshape(b, -1, 2).gather(1, cell.reshape(b, -1, 1).expand(b, -1, 2))
    grid = image_to_feature_grid(grid, (fh * stride, fw * stride), (fh, fw), stride, alignment)
    sampled = F.grid_sample(k_dense, grid[:, :, None, :].to(k_dense.dtype), mode="bilinear",
                            padding_mode="border", align_corners=False)
    return sampled[..., 0].transpose(1, 2).reshape(-1, d)


class DenseContrast(nn.Module):
    """InfoNCE between a cell of view A and the same scene point in view B.

    Args:
        dim: dense embedding size ``D``.
        queue_size: keys kept as negatives across steps (per class with ``num_classes``).
        temperature: InfoNCE temperature.
        samples_per_image: query cells drawn per image (bounds memory: N ≤ B·samples_per_image).
        batch_negatives: also use the positives of the other images' drawn cells as negatives.
            Cells of the *same* image are masked out: neighbouring cells are near-duplicates and
            would be false negatives.
        enqueue_per_image: key cells per image pushed to the queue each training step.
        stride: input pixels per cell of the dense maps (the encoder's dense stride); places
            the key map's cells (:mod:`densessl.cells`) when sampling it at ``grid_ab``.
        alignment: the encoder's ``cell_alignment`` (``"centre"`` or ``"block"``): with
            ``stride``, where the key map's cells sit.
        num_classes: if given, one queue ring per class (:class:`PerClassQueue`, SegLoc): a
            query cell of class c gets no negatives of class c, queued or in the batch. Cell
            classes come from ``class_map``; a key carries the class of the A cell it
            corresponds to; unknown cells (−1) see everything.
        background: what a ``class_map``'s −1 cells (background: the bag a segment was pasted
            on) are, when a class map is given:

            * ``"negative"``: unknown, as without a class map: a background query takes every
              key as a negative, and background keys (one shared ring) are negatives for
              everyone — including other background cells, which, with half the SegLoc pairs
              sharing a bag, are mostly the same material (false negatives);
            * ``"own_class"``: background is a class of its own (its own ring, label
              ``num_classes``): a background query takes no background negatives, and
              background keys are negatives for the segments' cells;
            * ``"ignore"``: background cells are neither queries nor keys (InsLoc / SegLoc
              contrast instances and segments only).

            ``own_class`` needs ``num_classes``; ``ignore`` also works with the single queue.
        robust: robust positives per query cell (:mod:`densessl.losses.robust`: RINCE,
            Chuang et al. 2022, or loss truncation, Kang & Hashimoto 2020); None = InfoNCE.
            Truncation ranks the cells of this process's batch.

    Shapes:
        ``forward(q_dense B×D×h×w, k_dense B×D×h'×w', grid_ab B×h×w×2, valid_ab B×h×w,
        class_map B×h×w long or None) -> (loss scalar, stats)``; ``q_dense`` comes from the
        online encoder on view A, ``k_dense`` from the momentum encoder on view B.
    """

    def __init__(
        self,
        dim: int = 128,
        queue_size: int = 8192,
        temperature: float = 0.2,
        samples_per_image: int = 64,
        batch_negatives: bool = True,
        enqueue_per_image: int = 16,
        num_classes: int | None = None,
        stride: int = 8,
        background: Literal["negative", "own_class", "ignore"] = "negative",
        robust: RobustPositives | None = None,
        alignment: str = "centre",
    ) -> None:
        super().__init__()
        if background not in ("negative", "own_class", "ignore"):
            raise ValueError(f"background must be 'negative', 'own_class' or 'ignore', got "
                             f"{background!r}")
        if background == "own_class" and num_classes is None:
            raise ValueError("background='own_class' needs per-class queues (num_classes)")
        self.dim = dim
        self.stride = stride
        if alignment not in CELL_ALIGNMENTS:
            raise ValueError(f"unknown cell alignment {alignment!r}; valid: "
                             f"{list(CELL_ALIGNMENTS)}")
        self.alignment = alignment
        self.background = background
        self.temperature = temperature
        self.samples_per_image = samples_per_image
        self.batch_negatives = batch_negatives
        self.enqueue_per_image = enqueue_per_image
        self.robust = robust
        #: with an enabled ``robust``, after each forward: per image of the local batch, the
        #: query cells (``cells``, B float) and how many were down-weighted (``down``); per
        #: query slot (B·n, image-major) the cell index (``slot_cell``), whether it holds a
        #: query (``slot_keep``) and whether it was down-weighted (``slot_down``); for
        #: analysis against the pairs' true noise (the loss never sees it)
        self.last_robust_cells: dict[str, Tensor] | None = None
        #: after each forward, the query slots of the local batch (B·n, image-major, as
        #: :func:`sample_cells`): ``features`` (B·n×D, L2-normalised, detached), ``image`` (B·n
        #: local image index) and ``keep`` (B·n bool, the slot holds a query cell). The
        #: collapse monitors read exactly these (densessl.methods.dense_pretraining): cells
        #: that are no query (e.g. the bag with ``background: "ignore"``) must not raise a
        #: collapse alarm, and no second draw is needed (the step's random stream is unchanged)
        self.last_queries: dict[str, Tensor] | None = None
        self.per_class = num_classes is not None
        # own_class: background takes the ring after the real classes
        rings = num_classes + (background == "own_class") if self.per_class else 0
        self.queue = (PerClassQueue(rings, queue_size, dim) if self.per_class
                      else MoCoQueue(queue_size, dim))

    def cell_labels(self, class_map: Tensor | None, b: int, length: int,
                    device: torch.device) -> tuple[Tensor, Tensor]:
        """Class of each cell as the loss uses it, and the cells that take part at all:
        ``(labels B×L long, allowed B×L bool)`` (see ``background``)."""
        if class_map is None:  # unknown class everywhere: no cell is masked for another's class
            labels = torch.full((b, length), -1, dtype=torch.long, device=device)
            return labels, torch.ones_like(labels, dtype=torch.bool)
        labels = class_map.reshape(b, length).long()
        background = labels < 0
        takes_part = ~background if self.background == "ignore" else torch.ones_like(background)
        if self.background == "own_class":
            labels = labels.masked_fill(background, self.queue.num_classes - 1)
        if not self.per_class:  # one queue: classes only decide who takes part
            labels = torch.full_like(labels, -1)
        return labels, takes_part

    def forward(
        self,
        q_dense: Tensor,
        k_dense: Tensor,
        grid_ab: Tensor,
        valid_ab: Tensor,
        class_map: Tensor | None = None,
        update_queue: bool | None = None,
        step: int = 0,
        pair_weight: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the loss, then (by default only in training mode) enqueue key cells.

        ``step`` (the host's training step) ramps in the truncation of ``robust``.
        ``pair_weight`` (B float, optional) scales the terms of each image's query cells, e.g.
        far-in-time dates (see :func:`~densessl.losses.functional.weighted_info_nce`).

        Gradients flow into ``q_dense`` and, if it requires grad, into ``k_dense`` through the
        positives and batch negatives; queued keys are always detached. No step reads a tensor
        value on the host, so on a GPU nothing waits for the device. With several processes,
        each must hold the same local batch size (cell slots are gathered without exchanging
        counts; the pretraining DataLoader drops the last incomplete batch).

        Returns:
            ``loss`` and detached scalar ``stats``: ``pairs`` (query cells), ``pos_cos`` (mean
            query-positive cosine), ``neg_cos`` (mean cosine to allowed negatives),
            ``queue_filled``; with an enabled ``robust`` also ``robust_fraction`` (share of the
            query cells down-weighted).
        """
        b, d, h, w = q_dense.shape
        if k_dense.shape[:2] != (b, d):
            raise ValueError(f"k_dense {tuple(k_dense.shape)} does not match q_dense {(b, d)}")
        if grid_ab.shape != (b, h, w, 2) or valid_ab.shape != (b, h, w):
            raise ValueError(
                f"grid_ab {tuple(grid_ab.shape)} / valid_ab {tuple(valid_ab.shape)} must be "
                f"{(b, h, w, 2)} / {(b, h, w)} to match q_dense"
            )
        if class_map is not None and class_map.shape != (b, h, w):
            raise ValueError(f"class_map {tuple(class_map.shape)} must be {(b, h, w)}")
        if update_queue is None:
            update_queue = self.training
        labels, takes_part = self.cell_labels(class_map, b, h * w, valid_ab.device)
        valid = valid_ab.reshape(b, h * w).bool() & takes_part

        image, cell, keep = sample_cells(valid, self.samples_per_image)
        q = F.normalize(cells_of(q_dense, cell), dim=1)
        k = F.normalize(keys_at(k_dense, grid_ab, cell, self.stride, self.alignment), dim=1)
        weight = keep.float()
        # a gather by image index: fixed shapes, no host read
        query_weight = None if pair_weight is None else pair_weight.to(weight)[image]
        label = cells_of(labels[:, None], cell)[:, 0]
        self.last_queries = {"features": q.detach(), "image": image, "keep": keep,
                             "label": label}

        keys, key_valid = self.queue.snapshot()
        allowed_rings = PerClassQueue.negatives_mask(label, self.queue.ring_labels)
        terms = [ring_negatives(q, keys, key_valid, allowed_rings, self.temperature, weight)]
        if self.batch_negatives:
            # other processes' cells too (MoCo-style gather): the negatives are those of the
            # global batch, whatever the number of processes; images get global indices
            image = image + rank() * b
            distributed = world_size() > 1
            # fixed B·n slots per process: no row counts to exchange (see gather_concat)
            keys_all = gather_concat(k.detach(), same_shape=True) if distributed else k
            image_all, keep_all, label_all = (gather_concat(t, same_shape=True)
                                              for t in (image, keep, label))
            allowed = (image[:, None] != image_all[None, :]) & keep_all[None, :]
            if self.per_class:
                allowed &= PerClassQueue.negatives_mask(label, label_all)
            terms.append(pairwise_negatives(q, keys_all, allowed, self.temperature, weight))
        loss, stats = weighted_info_nce(q, k, terms, self.temperature, weight, self.robust, step,
                                        query_weight)
        down = stats.pop("down_weighted", None)
        rank_fraction = stats.pop("rank_fraction", None)
        if down is not None:
            # slots are image-major with a fixed count per image: a reshape gives per-image sums
            n = weight.shape[0] // max(b, 1)
            self.last_robust_cells = {"cells": weight.reshape(b, n).sum(1),
                                      "down": (down.float() * weight).reshape(b, n).sum(1),
                                      "slot_cell": cell, "slot_keep": keep,
                                      "slot_down": down & keep, "slot_rank": rank_fraction}
        stats["queue_filled"] = self.queue.filled.sum().detach()

        # every process enqueues (possibly nothing): the queue gathers across processes
        if update_queue and self.enqueue_per_image > 0:
            _, e_cell, e_keep = sample_cells(valid, self.enqueue_per_image)
            e_keys = F.normalize(keys_at(k_dense.detach(), grid_ab, e_cell, self.stride,
                                           self.alignment), dim=1)
            if self.per_class:
                e_label = cells_of(labels[:, None], e_cell)[:, 0]
                self.queue.enqueue(e_keys, e_label, keep=e_keep, same_shape=True)
            else:
                self.queue.enqueue(e_keys, keep=e_keep, same_shape=True)
        return loss, stats


class PerClassDenseContrast(DenseContrast):
    """:class:`DenseContrast` with per-class queues (``num_classes`` required); kept as its own
    name for recipes and code that select the SegLoc objective explicitly."""

    def __init__(self, num_classes: int, dim: int = 128, queue_size: int = 1024,
                 temperature: float = 0.2, samples_per_image: int = 64,
                 batch_negatives: bool = True, enqueue_per_image: int = 16,
                 stride: int = 8, alignment: str = "centre") -> None:
        super().__init__(dim, queue_size, temperature, samples_per_image, batch_negatives,
                         enqueue_per_image, num_classes=num_classes, stride=stride,
                         alignment=alignment)
