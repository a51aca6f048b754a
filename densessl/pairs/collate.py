"""Collate PairSamples into a SourceBatch (stack sources, concatenate instances, collate paste
plans for the device-side compositing)."""

from __future__ import annotations

import torch

from densessl.contract import PairSample, SourceBatch
from densessl.errors import PairContractError
from densessl.pairs.correspondence import pixel_grid
from densessl.pairs.device_paste import collate_pastes


def _ones(h: int, w: int) -> torch.Tensor:
    return torch.ones(h, w, dtype=torch.bool)


def collate_pairs(samples: list[PairSample]) -> SourceBatch:
    shapes_a = {tuple(s.source_a.shape) for s in samples}
    shapes_b = {tuple(s.source_b.shape) for s in samples}
    if len(shapes_a) != 1 or len(shapes_b) != 1:
        raise PairContractError(f"all sources in a batch must share one shape; got source_a "
                                f"{sorted(shapes_a)} and source_b {sorted(shapes_b)}")
    planned = [s.paste is not None for s in samples]
    if any(planned) and not all(planned):
        raise PairContractError("a batch mixes samples with and without a paste plan; a "
                                "builder must defer compositing for all of its samples or none")
    _, ha, wa = samples[0].source_a.shape
    _, hb, wb = samples[0].source_b.shape
    any_grid = any(s.base_grid is not None for s in samples)
    base_grid = None
    if any_grid:
        base_grid = torch.stack([s.base_grid if s.base_grid is not None else pixel_grid(ha, wa)
                                 for s in samples])
    counts = [s.boxes_a.shape[0] for s in samples]
    box_batch = torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(counts))
    class_map = None
    if any(s.class_map_a is not None for s in samples):
        class_map = torch.stack([
            s.class_map_a if s.class_map_a is not None
            else torch.full((ha, wa), -1, dtype=torch.long) for s in samples])
    return SourceBatch(
        source_a=torch.stack([s.source_a for s in samples]),
        source_b=torch.stack([s.source_b for s in samples]),
        valid_a=torch.stack([s.valid_a if s.valid_a is not None else _ones(ha, wa)
                             for s in samples]),
        valid_b=torch.stack([s.valid_b if s.valid_b is not None else _ones(hb, wb)
                             for s in samples]),
        base_grid=base_grid,
        base_valid=torch.stack([s.base_valid if s.base_valid is not None else _ones(ha, wa)
                                for s in samples]),
        boxes_a=torch.cat([s.boxes_a.float() for s in samples]),
        boxes_b=torch.cat([s.boxes_b.float() for s in samples]),
        box_batch=box_batch,
        box_label=torch.cat([s.labels.long() for s in samples]),
        instance_ids=torch.cat([s.instance_ids.long() for s in samples]),
        class_map_a=class_map,
        noisy=torch.tensor([bool(s.noisy) for s in samples]),
        meta=[s.meta for s in samples],
        paste=collate_pastes([s.paste for s in samples]) if all(planned) else None,
    )
