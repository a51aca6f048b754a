"""Mismatch noise replaces source B with a donor's B; B's nodata mask must come with it."""

import torch

from densessl.contract import PairSample
from densessl.pairs import NoisyPairs, PairBuilder, collate_pairs

H = W = 16


class HalfNodata(PairBuilder):
    """Even samples: the left half of B is nodata; odd samples: no nodata mask at all."""

    def __len__(self):
        return 40

    def build(self, index):
        image = torch.full((1, H, W), float(index))
        valid_b = None
        if index % 2 == 0:
            valid_b = torch.ones(H, W, dtype=torch.bool)
            valid_b[:, : W // 2] = False
        return PairSample(source_a=image, source_b=image.clone(), valid_b=valid_b)


def test_valid_b_follows_the_donor():
    noisy = NoisyPairs(HalfNodata(), "mismatch", amount=1.0, seed=0)
    seen = set()
    for i in range(len(noisy)):
        s = noisy[i]
        donor = s.meta["noise"]["other_index"]
        assert int(s.source_b[0, 0, 0]) == donor
        # reference: the donor's own mask, all valid when it has none
        expected = torch.ones(H, W, dtype=torch.bool)
        if donor % 2 == 0:
            expected[:, : W // 2] = False
        got = s.valid_b if s.valid_b is not None else torch.ones(H, W, dtype=torch.bool)
        assert torch.equal(got, expected), f"pair {i} (donor {donor}): valid_b is not the donor's"
        seen.add((i % 2, donor % 2))
        assert collate_pairs([s]).valid_b[0].equal(expected)
    assert seen == {(0, 0), (0, 1), (1, 0), (1, 1)}  # every own/donor combination was checked
