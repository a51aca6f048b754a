import pytest
import torch

from densessl.methods.monitors import collapse_stats, dense_cells


def test_healthy_features_are_spread_and_collapsed_ones_are_not():
    torch.manual_seed(0)
    healthy = collapse_stats(torch.randn(64, 32))
    assert healthy["feature_std"] > 0.9 and abs(healthy["mean_cosine"]) < 0.1
    collapsed = collapse_stats(torch.ones(64, 32) + 1e-4 * torch.randn(64, 32))
    assert collapsed["feature_std"] < 0.01 and collapsed["mean_cosine"] > 0.99


def test_dense_cells_compare_only_different_images():
    # every image constant over its cells but different from the others: cosine across
    # images is ~0 even though cells within an image are identical
    torch.manual_seed(1)
    per_image = torch.randn(4, 16, 1, 1).expand(4, 16, 8, 8)
    cells, groups = dense_cells(per_image)
    assert cells.shape == (4 * 16, 16) and groups.tolist() == sorted(groups.tolist())
    stats = collapse_stats(cells, groups)
    reference = collapse_stats(per_image[:, :, 0, 0])
    torch.testing.assert_close(stats["mean_cosine"], reference["mean_cosine"])


def test_feature_std_is_the_sqrt_d_scaled_std_of_unit_features():
    # written out in float64: unit rows, unbiased std per dimension, mean, × √D
    features = torch.randn(10, 6, generator=torch.Generator().manual_seed(2)) * 3 + 1
    rows = [[v / sum(x * x for x in row) ** 0.5 for v in row] for row in features.double().tolist()]
    stds = []
    for j in range(6):
        col = [row[j] for row in rows]
        mean = sum(col) / len(col)
        stds.append((sum((v - mean) ** 2 for v in col) / (len(col) - 1)) ** 0.5)
    expected = sum(stds) / len(stds) * 6**0.5
    assert float(collapse_stats(features)["feature_std"]) == pytest.approx(expected, rel=1e-5)
