"""The xView2 score on hand-made maps with hand-computed answers (see the comments)."""

import numpy as np
import pytest
import torch

from densessl.data.labeled.xview2 import XView2Score, f1_from_counts, harmonic_mean, xview2_score

# Image 1, 4×4. Damage target: one row per class, two building pixels each.
TARGET_1 = np.array([[1, 1, 0, 0], [2, 2, 0, 0], [3, 3, 0, 0], [4, 4, 0, 0]])
LOC_PRED_1 = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]])
DAMAGE_PRED_1 = np.array([[1, 2, 4, 0], [2, 2, 0, 0], [3, 1, 0, 0], [4, 4, 0, 0]])
# Image 2: two no-damage pixels, localized, but called minor damage.
TARGET_2 = np.array([[1, 1], [0, 0]])
LOC_PRED_2 = np.array([[1, 1], [0, 0]])
DAMAGE_PRED_2 = np.array([[2, 2], [0, 0]])


def test_one_image_by_hand():
    # localization: 8 target pixels, 8 predicted, TP 7 / FP 1 (0,2) / FN 1 (1,1) → F1 = 14/16
    # damage (pred zeroed at (1,1) which is not localized; (0,2) is not a target building):
    #   class 1: TP (0,0), FN (0,1), FP (2,1) → 0.5; class 2: TP (1,0), FN (1,1), FP (0,1) → 0.5
    #   class 3: TP (2,0), FN (2,1) → P 1, R .5 → 2/3; class 4: TP 2 → 1
    metric = XView2Score()
    metric.update(LOC_PRED_1, DAMAGE_PRED_1, TARGET_1 > 0, TARGET_1)
    result = metric.compute()
    assert result["localization_f1"] == pytest.approx(0.875)
    assert [result[f"damage_f1_{c}"] for c in ("no_damage", "minor_damage", "major_damage",
                                              "destroyed")] == pytest.approx([0.5, 0.5, 2 / 3, 1])
    damage_f1 = 4 / (2 + 2 + 1.5 + 1)
    assert result["damage_f1"] == pytest.approx(damage_f1, abs=1e-5)
    assert result["score"] == pytest.approx(0.3 * 0.875 + 0.7 * damage_f1, abs=1e-5)


def test_counts_are_summed_and_absent_classes_skip_their_false_positives():
    # Image 2 adds loc TP 2 → 9/1/1 → F1 18/20; class 1 gains FN 2 → TP1 FN3 FP1 → F1 1/3.
    # Class 2 does not occur in image 2's target, so (as in the official scorer) its two
    # false positives there are not counted and class 2 keeps F1 0.5.
    result = xview2_score([LOC_PRED_1, LOC_PRED_2], [DAMAGE_PRED_1, DAMAGE_PRED_2],
                          [TARGET_1 > 0, TARGET_2 > 0], [TARGET_1, TARGET_2])
    assert result["localization_f1"] == pytest.approx(0.9)
    assert result["damage_f1_no_damage"] == pytest.approx(1 / 3)
    assert result["damage_f1_minor_damage"] == pytest.approx(0.5)
    damage_f1 = 4 / (3 + 2 + 1.5 + 1)
    assert result["damage_f1"] == pytest.approx(damage_f1, abs=1e-5)
    assert result["score"] == pytest.approx(0.27 + 0.7 * damage_f1, abs=1e-5)


def test_perfect_and_empty_predictions():
    perfect = xview2_score([TARGET_1 > 0], [TARGET_1], [TARGET_1 > 0], [TARGET_1])
    assert perfect["score"] == pytest.approx(1.0, abs=1e-5)
    empty = xview2_score([np.zeros((4, 4))], [np.zeros((4, 4))], [TARGET_1 > 0], [TARGET_1])
    assert empty["localization_f1"] == 0 and empty["score"] == pytest.approx(0.0, abs=1e-5)


def test_batches_tensors_and_default_localization_target():
    batched = XView2Score()
    batched.update(torch.tensor(np.stack([LOC_PRED_1, LOC_PRED_1])),
                   torch.tensor(np.stack([DAMAGE_PRED_1, DAMAGE_PRED_1])), None,
                   torch.tensor(np.stack([TARGET_1, TARGET_1])))
    single = XView2Score()
    for _ in range(2):
        single.update(LOC_PRED_1, DAMAGE_PRED_1, TARGET_1 > 0, TARGET_1)
    assert batched.compute() == single.compute()
    assert batched.loc.tolist() == [14, 2, 2]


def test_ignore_index_drops_unclassified_pixels_from_damage_only():
    target = TARGET_1.copy()
    target[0, 0] = 255  # un-classified: still a building, but no damage class
    metric = XView2Score(ignore_index=255)
    metric.update(LOC_PRED_1, DAMAGE_PRED_1, None, target)
    result = metric.compute()
    assert result["localization_f1"] == pytest.approx(0.875)  # (0,0) still a localized building
    # class 1 loses its TP (0,0): TP 0 → F1 0
    assert result["damage_f1_no_damage"] == 0.0


def test_f1_and_harmonic_mean_conventions():
    assert f1_from_counts(0, 5, 5) == 0.0
    assert f1_from_counts(3, 1, 1) == pytest.approx(0.75)
    assert harmonic_mean([1.0, 1.0]) == pytest.approx(1.0, abs=1e-5)
    assert harmonic_mean([0.0, 1.0]) < 1e-5
