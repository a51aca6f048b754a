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


def _builder(n_segments, k, classes=None, labels=None):
    backgrounds = [{"image": torch.full((3, SIZE, SIZE), 0.8)} for _ in range(2)]
    labels = labels or [i + 1 for i in range(n_segments)]
    return CutPastePairs(mode="segloc", k=k, blend="alpha", image_size=SIZE,
                         segments=[_segment(c) for c in labels], classes=classes,
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


def test_class_filter_pastes_only_those_classes():
    torch.manual_seed(2)
    labels = [1, 2, 3, 1, 2, 3, 4, 5]
    builder = _builder(len(labels), k=2, classes=[1, 3], labels=labels)
    seen = set()
    for i in range(64):
        pair = builder[i]
        picks = pair.meta["segments"]
        assert {labels[j] for j in picks} <= {1, 3}, picks  # bank indices of classes 1 and 3
        assert set(pair.labels.tolist()) <= {1, 3}
        classes_on_canvas = set(pair.class_map_a.unique().tolist()) - {-1}
        assert classes_on_canvas <= {1, 3}
        seen.update(picks)
    assert seen == {0, 2, 3, 5}  # every segment of those classes is drawn


def test_class_filter_errors_name_the_key():
    with pytest.raises(RecipeError, match=r"pairs\.options\.classes.*\[7\]"):
        _builder(4, k=2, classes=[1, 7])
    with pytest.raises(RecipeError, match=r"pairs\.options\.k: 3 distinct.*only 2 of classes"):
        _builder(4, k=3, classes=[1, 2])
