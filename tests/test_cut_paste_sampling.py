"""Cut-paste draws its k segments without replacement: one segment pasted twice into a pair
would be a negative of itself (with one queue, a false negative by construction)."""

import pytest
import torch

from densessl.errors import RecipeError
from densessl.pairs import CutPastePairs

SIZE = 48


def _segment(label):
    mask = torch.zeros(12, 12, dtype=torch.bool)
    mask[2:10, 2:10] = True
    return {"image": torch.full((3, 12, 12), 0.1 * label), "mask": mask, "label": label,
            "source_size": SIZE}


def _builder(n_segments, k):
    backgrounds = [{"image": torch.full((3, SIZE, SIZE), 0.8)} for _ in range(2)]
    return CutPastePairs(mode="segloc", k=k, blend="alpha", image_size=SIZE,
                         segments=[_segment(i + 1) for i in range(n_segments)],
                         backgrounds=backgrounds, num_pairs=64)


def test_segments_of_one_pair_are_distinct():
    torch.manual_seed(0)
    builder = _builder(n_segments=4, k=3)
    # with replacement, 1 - (4·3·2)/4³ = 62.5 % of pairs would repeat a segment
    for i in range(64):
        picks = builder[i].meta["segments"]
        assert len(picks) == 3 and len(set(picks)) == 3, f"pair {i} repeats a segment: {picks}"


def test_a_bank_of_exactly_k_uses_every_segment_once():
    torch.manual_seed(1)
    builder = _builder(n_segments=3, k=3)
    for i in range(16):
        assert sorted(builder[i].meta["segments"]) == [0, 1, 2]


def test_fewer_segments_than_k_is_a_clear_error():
    with pytest.raises(RecipeError, match=r"pairs\.options\.k: 5 distinct segments.*only 3"):
        _builder(n_segments=3, k=5)
