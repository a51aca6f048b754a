"""Where the dense objective's query cells go: ``densessl inspect-pairs RECIPE --cells``.

The dense term trains only on cells of view A whose scene point is known exactly in view B
(and, with ``loss.dense.background: ignore``, that lie on a pasted segment). When a run reports few
``dense_query_cells_per_image`` (metrics.json), this table says which step loses them, so the
fix (paste scale, view size, crop) is chosen from a measurement instead of by loosening the
correspondence. Each stage keeps the cells of the one before that pass one more rule:

1. ``view cells``: every cell of view A's grid;
2. ``on source A``: its point lies on source A's data (``valid_a``, strict bilinear read);
3. ``take part``: the objective uses it (``background: ignore``: on a segment, not the bag);
4. ``exact in source B``: the base correspondence is exact there (``base_valid``: for cut-paste,
   the pixel shows one instance alone and fully, one pixel from any edge, in both sources);
5. ``inside view B``: its point lands on source B's data inside view B: a query cell;
6. ``drawn``: at most ``loss.dense.samples_per_image`` of them are drawn per image.
"""

from __future__ import annotations

import torch

from densessl.augment.correspondence import compose_correspondence, sample_at, sample_mask
from densessl.build import backbone_cell_alignment, build_augmentation, build_pair_builder
from densessl.pairs import collate_pairs
from densessl.pairs.correspondence import inside_image
from densessl.pairs.device_paste import composite_pastes
from densessl.recipe import load_recipe
from densessl.workflows.data_settings import resolve_data_settings

STAGES = ("view cells", "on source A", "take part", "exact in source B", "inside view B",
          "drawn")


@torch.no_grad()
def cell_budget(recipe, overrides: list[str] | None = None, count: int = 64,
                seed: int = 0) -> dict[str, float]:
    """Mean cells per image left after each stage (:data:`STAGES`) over ``count`` pairs."""
    recipe = load_recipe(recipe, overrides)
    torch.manual_seed(seed)
    builder = build_pair_builder(recipe)
    resolve_data_settings(recipe, builder)
    augment = build_augmentation(recipe, grid_stride=recipe.model.dense_stride,
                                 cell_alignment=backbone_cell_alignment(recipe))
    indices = torch.randperm(len(builder))[:count].tolist()
    batch = collate_pairs([builder[i] for i in indices])
    return budget_of(batch, augment, recipe.loss.dense.background,
                     recipe.loss.dense.samples_per_image)


@torch.no_grad()
def budget_of(batch, augment, background: str, samples_per_image: int) -> dict[str, float]:
    """:func:`cell_budget` of one collated batch of sources, with ``augment`` (its view
    geometry is drawn from torch's RNG as the training step draws it)."""
    batch = composite_pastes(batch)
    _, matrix_a = augment.geometry_a(batch.source_a)
    _, matrix_b = augment.geometry_b(batch.source_b)
    side = augment.view_size // augment.grid_stride
    size = (augment.view_size, augment.view_size)
    # the real rule (what training uses) gives the last stage; the others are its parts
    _, valid_ab, src_a = compose_correspondence(
        matrix_a, matrix_b, (side, side), size, size, batch.valid_a, batch.valid_b,
        batch.base_grid, batch.base_valid, alignment=augment.cell_alignment)
    stages = [torch.ones_like(valid_ab)]
    stages.append(inside_image(src_a, tuple(batch.valid_a.shape[-2:]))
                  & sample_mask(batch.valid_a, src_a))
    take_part = torch.ones_like(valid_ab)
    if background == "ignore" and batch.class_map_a is not None:
        shifted = (batch.class_map_a + 1).float()[:, None]  # outside decodes to -1 (unknown)
        take_part = sample_at(shifted, src_a, mode="nearest")[:, 0] > 0.5
    stages.append(stages[-1] & take_part)
    exact = (torch.ones_like(valid_ab) if batch.base_valid is None
             else sample_mask(batch.base_valid, src_a))
    stages.append(stages[-1] & exact)
    stages.append(valid_ab & take_part)
    counts = [s.flatten(1).sum(1).float() for s in stages]
    counts.append(counts[-1].clamp(max=samples_per_image))
    return {name: float(c.mean()) for name, c in zip(STAGES, counts)}


def format_budget(budget: dict[str, float]) -> str:
    """The table ``--cells`` prints: cells per image after each stage and the share kept."""
    lines = ["stage                 cells/image   kept"]
    previous = None
    for name, value in budget.items():
        kept = "" if not previous else f"{100 * value / previous:5.1f} %"
        lines.append(f"{name:<21} {value:11.2f}   {kept}")
        previous = value
    return "\n".join(lines)
