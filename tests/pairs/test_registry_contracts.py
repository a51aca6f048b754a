"""Contract tests every registry entry inherits (as timm and smp test every model they list).

* Every registered pair builder (``densessl.pairs.available_pair_builders()``): its samples pass
  the pair validation, and its correspondence is exact by colour — on sources painted with
  their own pixel coordinates, the colour source A shows at a valid pixel is the colour source
  B shows at ``base_grid``, and after view augmentation view B at ``grid_ab`` shows the colour
  view A shows at each valid cell. A newly registered builder fails here until it gets a
  painted factory in ``PAINTED``.
* Every backbone the recipe accepts builds, runs (C2..C5 at strides 4..32 with the declared
  channels, finite, a backward pass reaches the stem) and exports (``densessl export --to
  timm`` loads into timm's own model, which then computes our C5).
"""

from __future__ import annotations

import re
import typing

import pytest
import torch
from helpers import colours_agree, coordinate_image, painted_builder

import densessl.models
from densessl.augment import ViewAugmentation
from densessl.augment.correspondence import sample_at
from densessl.pairs import (
    SameImagePairs,
    TemporalPairs,
    available_pair_builders,
    collate_pairs,
    validate_pair_sample,
)
from densessl.recipe import ModelConfig, load_recipe

SIZE, VIEW = 64, 48

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------- pair builders


def _with_nodata(width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A painted image whose first ``width`` columns are nodata, painted (0, 0, 0) there so a
    correspondence that lands on them disagrees by colour; and its valid mask."""
    image, valid = coordinate_image(SIZE), torch.ones(SIZE, SIZE, dtype=torch.bool)
    valid[:, :width] = False
    image[:, ~valid] = 0.0
    return image, valid


def painted_same_image():
    images = [{"image": coordinate_image(SIZE)} for _ in range(8)]
    images[1]["image"], images[1]["valid"] = _with_nodata(12)  # nodata restricts the pairs
    return SameImagePairs(images)


def painted_temporal():
    """Co-registered tiles: the same painted place at both dates, each with its own nodata."""
    items = []
    for i in range(8):
        (t0, v0), (t1, v1) = _with_nodata(8 * (i % 2)), _with_nodata(16 * (i % 3))
        items.append({"image_t0": t0, "image_t1": t1, "valid_t0": v0, "valid_t1": v1})
    return TemporalPairs(items, swap_p=0.5)


#: builder name → a builder on coordinate-painted sources (channels 0/1 = x/y over SIZE,
#: channel 2 = a code that differs between segments and backgrounds where there are several)
PAINTED = {
    "same_image": painted_same_image,
    "temporal": painted_temporal,
    "cut_paste": lambda: painted_builder(k=3),
}

BUILDERS = available_pair_builders()


def test_the_library_registers_the_builders_it_documents():
    assert {"same_image", "cut_paste", "temporal"} <= set(BUILDERS)


def painted(name):
    if name not in PAINTED:
        pytest.fail(f"pair builder {name!r} is registered but has no painted factory in "
                    "tests/pairs/test_registry_contracts.py PAINTED: add one so it is held to the "
                    "correspondence contract")
    torch.manual_seed(0)
    return PAINTED[name]()


@pytest.mark.parametrize("name", BUILDERS)
def test_pair_builder_samples_pass_validation(name):
    builder = painted(name)
    assert len(builder) >= 8
    for i in range(8):
        sample = builder.build(i)  # not __getitem__, which validates already
        validate_pair_sample(sample, name)


@pytest.mark.parametrize("name", BUILDERS)
def test_pair_builder_base_correspondence_by_colour(name):
    builder = painted(name)
    checked = 0
    for i in range(8):
        s = builder[i]
        h, w = s.source_a.shape[1:]
        ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(),
                                indexing="ij")
        grid = s.base_grid if s.base_grid is not None else torch.stack([xs, ys], -1)
        valid = s.base_valid if s.base_valid is not None else torch.ones(h, w, dtype=bool)
        if s.valid_a is not None:
            valid = valid & s.valid_a
        if s.valid_b is not None:  # where the pixel lands on source B's data
            valid = valid & (sample_at(s.valid_b[None, None].float(), grid[None])[0, 0] > 0.999)
        seen_b = sample_at(s.source_b[None], grid[None])[0]
        error_px = (s.source_a[:2] - seen_b[:2]).abs().amax(0) * SIZE
        assert (error_px[valid] < 0.05).all(), f"{name} pair {i}: colours differ"
        assert ((s.source_a[2] - seen_b[2]).abs()[valid] < 1e-3).all()
        checked += int(valid.sum())
    assert checked > 8 * SIZE * SIZE // 10


@pytest.mark.parametrize("name", BUILDERS)
def test_pair_builder_views_agree_by_colour(name):
    builder = painted(name)
    batch = collate_pairs([builder[i] for i in range(8)])
    aug = ViewAugmentation(3, view_size=VIEW, grid_stride=4, photometry=None, mean=0.0, std=1.0,
                           geometry=dict(crop_scale=(0.3, 1.0), hflip=0.5, vflip=0.5,
                                         rotation_degrees=30, rotation_p=1.0))
    pair = aug(batch)
    _, agree = colours_agree(pair, VIEW, cells=12, size=SIZE, code_tol=0.01)
    valid = pair.valid_ab
    assert valid.sum() > 150, f"{name}: almost no valid cells"
    assert agree[valid].float().mean() >= 0.99, f"{name}: views disagree at valid cells"


# ---------------------------------------------------------------- backbones


def accepted_backbones() -> list[str]:
    """The backbones a recipe's ``model.backbone`` accepts: a list ``densessl.models`` exports
    when it has one, else the field's ``Literal`` choices, else (a ``str`` field checked by a
    validator) the torchvision ResNets plus the ``timm:<name>`` examples the field documents."""
    for attr in ("SUPPORTED_BACKBONES", "BACKBONES", "supported_backbones",
                 "available_backbones"):
        found = getattr(densessl.models, attr, None)
        if found is not None:
            return sorted(found() if callable(found) else found)
    field = ModelConfig.model_fields["backbone"]
    choices = list(typing.get_args(field.annotation))
    if choices:
        return choices
    from densessl.models.backbone import STAGE_CHANNELS

    return sorted(STAGE_CHANNELS) + re.findall(r"timm:[\w.]+", field.description or "")


BACKBONES = accepted_backbones()
CHANNELS = 4  # not 3: the stem is rebuilt, as for multispectral / multi-date stacks


def test_the_recipe_accepts_every_listed_backbone():
    assert {"resnet18", "resnet34", "resnet50"} <= set(BACKBONES)
    for name in BACKBONES:
        assert load_recipe({"model": {"backbone": name}}).model.backbone == name


def _build(name):
    from densessl.build import build_encoder

    recipe = load_recipe({"model": {"backbone": name, "neck_dim": 16, "dense_dim": 16,
                                    "global_dim": 16}, "data": {"channels": CHANNELS}})
    torch.manual_seed(0)
    return build_encoder(recipe)


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_builds_and_runs(name):
    encoder = _build(name)
    backbone = encoder.backbone
    x = torch.rand(2, CHANNELS, 64, 64, generator=torch.Generator().manual_seed(1))
    feats = backbone(x)
    assert list(feats) == ["c2", "c3", "c4", "c5"]
    for level, stride in zip(feats, (4, 8, 16, 32)):
        assert feats[level].shape == (2, backbone.channels[level], 64 // stride, 64 // stride)
        assert torch.isfinite(feats[level]).all()
    assert feats["c5"].std() > 0
    out = encoder(x)  # the whole encoder (neck, heads) on top of it
    assert out["dense"].shape[-2:] == (8, 8)  # dense_stride 8
    assert torch.isfinite(out["dense"]).all() and torch.isfinite(out["global"]).all()
    (out["dense"].square().mean() + out["global"].square().mean()).backward()
    stem = next(p for p in backbone.parameters() if p.ndim == 4)  # the first conv
    assert stem.shape[1] == CHANNELS and stem.grad is not None and stem.grad.abs().sum() > 0


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_exports_to_timm(name, tmp_path):
    import timm

    from densessl.io import save_torch, write_json
    from densessl.workflows.export import export_weights

    backbone = _build(name).backbone.eval()
    save_torch(tmp_path / "encoder.pt", backbone.state_dict())
    write_json(tmp_path / "encoder.json", {"backbone": name, "in_channels": CHANNELS})
    out = export_weights(tmp_path / "encoder.pt", "timm", tmp_path / "exported.pt")
    state = torch.load(out)
    timm_name = name.removeprefix("timm:")
    # timm's full model: every exported tensor has its place (only layers past C5 may miss)
    full = timm.create_model(timm_name, pretrained=False, num_classes=0, in_chans=CHANNELS)
    result = full.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    # timm's own model computes our C5 from the exported weights (its stride-32 stage output)
    full.eval()
    x = torch.rand(2, CHANNELS, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = backbone(x)["c5"]
        theirs = [f for f in full.forward_intermediates(x, intermediates_only=True)
                  if f.shape[-1] == 2 or f.shape[-2] == 2][-1]  # the last stride-32 output
    if theirs.shape != ours.shape:  # a few timm families give NHWC
        theirs = theirs.permute(0, 3, 1, 2)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
