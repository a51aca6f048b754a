"""Noise injectors do what they say, measured on the pixels of a toy builder whose every pixel
has a unique value (so where a B pixel came from can be read back)."""

import pickle

import pytest
import torch
from helpers import UniquePixels

from densessl.build import build_pair_builder
from densessl.errors import PairContractError, RecipeError
from densessl.pairs import NoisyPairs, collate_pairs
from densessl.recipe import load_recipe

H = W = 32


def changed(sample):
    return (sample.source_a[0] != sample.source_b[0])


def test_mismatch_rate_matches_p_and_b_comes_from_another_sample():
    noisy = NoisyPairs(UniquePixels(400), "mismatch", amount=0.3, seed=1)
    samples = [noisy[i] for i in range(len(noisy))]
    replaced = [bool(changed(s).all()) for s in samples]
    assert [s.noisy for s in samples] == replaced  # the flag tells the truth
    assert abs(sum(replaced) / len(replaced) - 0.3) < 0.06
    for i, s in enumerate(samples):
        if s.noisy:  # B is exactly another sample's B, never its own
            other = int(s.source_b[0, 0, 0].item()) // (H * W)
            assert other != i and other == s.meta["noise"]["other_index"]
            assert s.base_grid is None and s.base_valid is None  # correspondence untouched


def test_deterministic_given_seed_and_index():
    a = NoisyPairs(UniquePixels(), "partial_change", amount=0.4, seed=3)
    b = NoisyPairs(UniquePixels(), "partial_change", amount=0.4, seed=3)
    c = NoisyPairs(UniquePixels(), "partial_change", amount=0.4, seed=4)
    assert all(torch.equal(a[i].source_b, b[i].source_b) for i in (0, 7, 13))
    assert not all(torch.equal(a[i].source_b, c[i].source_b) for i in (0, 7, 13))
    restored = pickle.loads(pickle.dumps(a))  # DataLoader workers get a copy
    assert torch.equal(restored[5].source_b, a[5].source_b)


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.6])
def test_partial_change_replaces_fraction_of_area(fraction):
    noisy = NoisyPairs(UniquePixels(), "partial_change", amount=fraction, patch=4, seed=0)
    for i in range(10):
        s = noisy[i]
        area = changed(s).float().mean().item()
        assert abs(area - fraction) <= 16 / (H * W) / 2 + 1e-6  # within half a 4×4 patch
        assert s.meta["noise"]["changed_fraction"] == pytest.approx(area)
        other = s.meta["noise"]["other_index"]  # replaced by the other sample's same place
        donor = UniquePixels()[other].source_b[0]
        assert torch.equal(s.source_b[0][changed(s)], donor[changed(s)])


@pytest.mark.parametrize("shift", [1, 3, 5])
def test_misregistration_shifts_by_exactly_s_pixels(shift):
    noisy = NoisyPairs(UniquePixels(), "misregistration", amount=shift, seed=2)
    directions = set()
    for i in range(12):
        s = noisy[i]
        dx, dy = (int(v) for v in s.meta["noise"]["shift"])
        directions.add((dx, dy))
        # Read the displacement off the pixels: where did A's pixel (16, 16) go in B?
        ys, xs = torch.nonzero(s.source_b[0] == s.source_a[0, 16, 16], as_tuple=True)
        assert (int(xs[0]) - 16, int(ys[0]) - 16) == (dx, dy)
        assert abs(dx) + abs(dy) == shift
        # The correspondence still says "same pixel", and moved-in pixels have no data.
        assert s.base_grid is None
        assert int((~s.valid_b).sum()) == shift * H
        # Every valid B pixel is A's pixel shifted by (dx, dy).
        yy, xx = torch.nonzero(s.valid_b, as_tuple=True)
        assert torch.equal(s.source_b[0, yy, xx], s.source_a[0, yy - dy, xx - dx])
    assert len(directions) > 1


def test_wrong_class_swaps_instance_content_for_another_class():
    base = UniquePixels(30, instances=True)
    noisy = NoisyPairs(base, "wrong_class", amount=1.0, seed=0)
    for i in range(12):
        s = noisy[i]
        assert s.noisy and s.labels.tolist() == [i % 3]  # pairing and labels are kept
        assert torch.equal(s.boxes_b, base[i].boxes_b)
        content = s.source_b[1, 4:20, 4:20].unique().tolist()  # the class colour in view B
        assert len(content) == 1 and content[0] != i % 3
        assert content[0] == s.meta["noise"]["swaps"][0]["new_label"]
        assert torch.equal(s.source_a, base[i].source_a)


def test_wrong_class_without_instances_is_a_clear_error():
    with pytest.raises(PairContractError, match="wrong_class needs a pair builder with labeled"):
        NoisyPairs(UniquePixels(), "wrong_class", amount=0.5)
    recipe = load_recipe({"data": {"options": {"num_images": 8}, "image_size": 32},
                          "augment": {"view_size": 32},
                          "noise": {"kind": "wrong_class", "amount": 0.5}})
    with pytest.raises(RecipeError, match="wrong_class"):
        build_pair_builder(recipe)


def test_recipe_noise_section_wraps_builder_and_keeps_provenance():
    recipe = load_recipe({"data": {"options": {"num_images": 8}, "image_size": 32},
                          "augment": {"view_size": 32},
                          "noise": {"kind": "misregistration", "amount": 2, "rate": 0.5}})
    builder = build_pair_builder(recipe)
    assert isinstance(builder, NoisyPairs) and builder.dataset is builder.source.dataset
    batch = collate_pairs([builder[i] for i in range(8)])
    assert batch.noisy.tolist() == [m["noise"]["applied"] for m in batch.meta]
    assert 0 < int(batch.noisy.sum()) < 8
    with pytest.raises(RecipeError, match="noise.amout"):
        load_recipe({"noise": {"amout": 0.5}})
    with pytest.raises(RecipeError, match="fraction"):
        load_recipe({"noise": {"kind": "mismatch", "amount": 2}})
