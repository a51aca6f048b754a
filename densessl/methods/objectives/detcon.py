"""DetCon's mask-pooled contrast (Hénaff et al., "Efficient Visual Pretraining with Contrastive
Detection", ICCV 2021), on the pair contract's exact correspondence.

Segments are the classes of view A's class map (``PairBatch.class_map_a``, one id per cell; the
pairs carry no per-instance masks, so a segment is all of an image's cells of one class, and
with ``background: segment`` its bag). For each image and segment, the online dense embeddings
of view A are averaged over the segment's valid cells, and the momentum embeddings of view B
over the same scene points (bilinear at ``grid_ab``, as the dense objective's keys): the masks
need no warping, the correspondence carries them. Both pooled vectors are L2-normalised and each
segment's query is contrasted with its own key against the keys of every other segment of the
batch (InfoNCE, temperature ``T``). Without a class map every image is one segment (its valid
cells).

Fixed shapes: every image has ``S`` segment slots (``max_classes``, plus one for the
background), a ``keep`` mask marks the slots with at least ``min_cells`` valid cells, and
nothing is read on the host. Negatives are the local batch's segments (no queue, no gather
across processes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from densessl.errors import RecipeError
from densessl.losses.dense_contrast import keys_at
from densessl.methods.objectives.base import Objective, ObjectiveOutput, StepInputs
from densessl.recipe import DetConConfig

#: a masked logit: exp() of it is 0 in float32 and bfloat16, and it keeps gradients finite
MASKED_LOGIT = -1e9


def segment_masks(class_map: Tensor | None, valid: Tensor, max_classes: int,
                  background: bool) -> Tensor:
    """``B×L×S`` float one-hot segment membership of each valid cell (``L = h·w``): class
    ``c`` in ``[0, max_classes)`` → slot ``c``; −1 → slot ``max_classes`` with ``background``,
    else no slot; larger ids no slot. ``class_map`` None: one slot, every valid cell."""
    b = valid.shape[0]
    valid = valid.reshape(b, -1)
    if class_map is None:
        return valid.float()[:, :, None]
    labels = class_map.reshape(b, -1).long()
    slots = max_classes + int(background)
    seg = labels.masked_fill(labels >= max_classes, slots)        # no slot
    seg = seg.masked_fill(labels < 0, max_classes if background else slots)
    inside = valid & (seg < slots)
    onehot = F.one_hot(seg.clamp(0, slots - 1), slots).float()
    return onehot * inside.float()[:, :, None]


def detcon_loss(q_dense: Tensor, k_dense: Tensor, grid_ab: Tensor, valid_ab: Tensor,
                class_map: Tensor | None, temperature: float, max_classes: int,
                background: bool = False, min_cells: int = 1, stride: int = 8,
                alignment: str = "centre", pair_weight: Tensor | None = None,
                ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """The mask-pooled InfoNCE. Returns ``(loss, stats, queries)``: ``stats`` detached
    (``masks``: segments taking part, ``pos_cos``, ``neg_cos``), ``queries`` the pooled
    query slots (``features`` B·S×D detached, ``image``, ``keep``) for the monitors.
    ``pair_weight`` (B) scales each image's terms, outside the mean's denominator (as
    :func:`densessl.losses.functional.weighted_info_nce`)."""
    b, d, h, w = q_dense.shape
    cells = h * w
    masks = segment_masks(class_map, valid_ab, max_classes, background)      # B×L×S
    slots = masks.shape[-1]
    counts = masks.sum(1)                                                    # B×S
    keep = (counts >= min_cells).reshape(-1)                                 # B·S
    every = torch.arange(cells, device=q_dense.device).repeat(b)
    k_cells = keys_at(k_dense, grid_ab, every, stride, alignment).reshape(b, cells, d)
    denom = counts.clamp_min(1)[:, :, None]
    masks = masks.to(q_dense.dtype)
    q = torch.einsum("bls,bdl->bsd", masks, q_dense.reshape(b, d, cells)) / denom
    k = torch.einsum("bls,bld->bsd", masks.to(k_cells.dtype), k_cells) / denom
    work = torch.promote_types(q.dtype, torch.float32)  # float32 at least (float64 stays)
    q = F.normalize(q.reshape(-1, d).to(work), dim=1)
    k = F.normalize(k.reshape(-1, d).to(work), dim=1)
    cos = q @ k.t()                                                          # N×N, N = B·S
    logits = (cos / temperature).masked_fill(~keep[None, :], MASKED_LOGIT)
    n = cos.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=cos.device)
    per_query = torch.logsumexp(logits, dim=1) - logits.diagonal()
    weight = keep.float()
    factor = weight if pair_weight is None else \
        weight * pair_weight.to(weight).repeat_interleave(slots)
    loss = (per_query * factor).sum() / weight.sum().clamp_min(1.0)
    negatives = (keep[:, None] & keep[None, :] & ~eye).float()
    with torch.no_grad():
        stats = {"masks": weight.sum(),
                 "pos_cos": (cos.diagonal() * weight).sum() / weight.sum().clamp_min(1.0),
                 "neg_cos": (cos * negatives).sum() / negatives.sum().clamp_min(1.0)}
    queries = {"features": q.detach(),
               "image": torch.arange(b, device=q.device).repeat_interleave(slots),
               "keep": keep}
    return loss, stats, queries


class DetConObjective(Objective):
    name = "detcon"
    config_class = DetConConfig
    monitor_priority = 40

    def build(self, encoder):
        c = self.config
        self.max_classes = c.max_classes or self.recipe.loss.num_classes
        if self.max_classes is None:
            raise RecipeError("loss.detcon needs its segment slots: set loss.detcon.max_classes "
                              "or loss.num_classes")
        self.stride, self.alignment = encoder.stride, encoder.cell_alignment
        self.last_queries: dict[str, Tensor] | None = None
        return None  # no parameters, no queue

    def __call__(self, inputs: StepInputs) -> ObjectiveOutput:
        batch, c = inputs.batch, self.config
        loss, stats, self.last_queries = detcon_loss(
            inputs.query["dense"], inputs.key["dense"], batch.grid_ab, batch.valid_ab,
            batch.class_map_a, c.temperature, self.max_classes,
            background=c.background == "segment", min_cells=c.min_cells, stride=self.stride,
            alignment=self.alignment, pair_weight=batch.pair_weight)
        logs = {"loss_detcon": loss.detach()}
        logs.update({f"detcon_{k}": v for k, v in stats.items()})
        return ObjectiveOutput(self.weight * loss, logs)

    def monitor_features(self, batch, query, state=None):
        """The pooled segment queries that take part (one per segment and image)."""
        cells = self.last_queries
        if cells is None:
            return None
        return {"features": cells["features"], "groups": cells["image"],
                "mask": cells["keep"], "num_groups": batch.batch_size}
