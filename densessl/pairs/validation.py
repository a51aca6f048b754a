"""Checks that a builder's output honours the PairSample contract (errors name builder + field)."""

from __future__ import annotations

import torch

from densessl.contract import PairSample
from densessl.errors import PairContractError
from densessl.pairs.correspondence import inside_image


def _fail(builder: str, field: str, problem: str) -> None:
    raise PairContractError(f"pair builder {builder}: field {field!r} {problem}")


def validate_pair_sample(sample: PairSample, builder: str = "custom") -> None:
    """Raise :class:`PairContractError` when ``sample`` breaks the contract."""
    if not isinstance(sample, PairSample):
        _fail(builder, "return value", f"must be a PairSample, got {type(sample).__name__}")
    for name in ("source_a", "source_b"):
        src = getattr(sample, name)
        # uint8 only for backgrounds awaiting the device-side paste, which scales them
        deferred_uint8 = sample.paste is not None and getattr(src, "dtype", None) == torch.uint8
        if not torch.is_tensor(src) or src.ndim != 3 or not (src.is_floating_point()
                                                             or deferred_uint8):
            _fail(builder, name, "must be a float tensor C×H×W (uint8 only with a paste plan), "
                  f"got {getattr(src, 'dtype', type(src).__name__)} "
                  f"{tuple(getattr(src, 'shape', ()))}")
    ca, ha, wa = sample.source_a.shape
    cb, hb, wb = sample.source_b.shape
    if ca != cb:
        _fail(builder, "source_b", f"has {cb} channels but source_a has {ca}; both views must "
              "have the same channel count (use per-modality stems for multi-sensor pairs)")
    for name, (h, w) in (("valid_a", (ha, wa)), ("valid_b", (hb, wb)),
                         ("base_valid", (ha, wa)), ("class_map_a", (ha, wa)),
                         ("noise_mask_a", (ha, wa))):
        value = getattr(sample, name)
        if value is not None and tuple(value.shape) != (h, w):
            _fail(builder, name, f"must have shape {(h, w)}, got {tuple(value.shape)}")
    if sample.base_grid is not None:
        grid = sample.base_grid
        if tuple(grid.shape) != (ha, wa, 2):
            _fail(builder, "base_grid", f"must have shape {(ha, wa, 2)} (pixel x, y in source_b "
                  f"for each source_a pixel), got {tuple(grid.shape)}")
        valid = (sample.base_valid if sample.base_valid is not None
                 else torch.ones(ha, wa, dtype=torch.bool))
        outside = valid & ~inside_image(grid, (hb, wb))
        if outside.any():
            _fail(builder, "base_grid", f"has {int(outside.sum())} positions outside source_b "
                  f"({wb}×{hb}) marked valid; set base_valid False there")
    if sample.pair_weight is not None and not (0.0 <= float(sample.pair_weight) < float("inf")):
        _fail(builder, "pair_weight", f"must be a finite weight >= 0, got {sample.pair_weight}")
    if sample.paste is not None:
        _validate_plan(sample, builder, ca)
    n = sample.boxes_a.shape[0]
    if sample.boxes_a.shape != (n, 4) or sample.boxes_b.shape != (n, 4):
        _fail(builder, "boxes_b", f"boxes_a and boxes_b must both be N×4 with the same N, got "
              f"{tuple(sample.boxes_a.shape)} and {tuple(sample.boxes_b.shape)}")
    if sample.instance_ids.shape != (n,):
        _fail(builder, "instance_ids", f"must give one id per box (shape ({n},)), got "
              f"{tuple(sample.instance_ids.shape)}")
    if sample.labels.shape != (n,):
        _fail(builder, "labels", f"must give one class per box (shape ({n},)), got "
              f"{tuple(sample.labels.shape)}")


def _validate_plan(sample: PairSample, builder: str, channels: int) -> None:
    plan = sample.paste
    k = len(plan.crops)
    if k == 0 or len(plan.masks) != k:
        _fail(builder, "paste.masks", f"must give one mask per crop (at least one crop), got "
              f"{len(plan.masks)} masks for {k} crops")
    for j, (crop, mask) in enumerate(zip(plan.crops, plan.masks)):
        if crop.ndim != 3 or crop.shape[0] != channels:
            _fail(builder, "paste.crops", f"[{j}] must be C×h×w with the sources' {channels} "
                  f"channels, got {tuple(crop.shape)}")
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(crop.shape[1:]):
            _fail(builder, "paste.masks", f"[{j}] must be a bool mask of the crop's size "
                  f"{tuple(crop.shape[1:])}, got {mask.dtype} {tuple(mask.shape)}")
    affine_row = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    for name in ("matrix_a", "matrix_b"):
        matrix = torch.as_tensor(getattr(plan, name), dtype=torch.float64)
        if tuple(matrix.shape) != (k, 3, 3):
            _fail(builder, f"paste.{name}", f"must be k×3×3 = ({k}, 3, 3), got "
                  f"{tuple(matrix.shape)}")
        if not torch.allclose(matrix[:, 2], affine_row.expand(k, 3)):
            _fail(builder, f"paste.{name}", "must hold affine maps (last row 0, 0, 1)")
    if tuple(plan.labels.shape) != (k,):
        _fail(builder, "paste.labels", f"must give one class per crop (shape ({k},)), got "
              f"{tuple(plan.labels.shape)}")
    if plan.blend not in ("alpha", "transmission"):
        _fail(builder, "paste.blend", f"must be 'alpha' or 'transmission', got {plan.blend!r}")
