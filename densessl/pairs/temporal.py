"""Temporal pairs: two dates of the same place (xBD pre/post, multi-date GeoTIFF tiles).

The two dates share one pixel grid (the data source co-registers them), so the base
correspondence is the identity; only the content may differ (seasons, a disaster). Each view
still gets its own geometry later, on the device.

Series of more than two dates (``pairs.options.dates``, see :class:`TemporalPairs`) pick the
pair by time gap: near-in-time dates as full positives, far-in-time dates as positives with a
lower weight (``pair_weight``, which the losses multiply into the pair's terms).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from densessl.contract import PairSample
from densessl.errors import PairContractError
from densessl.pairs.base import PairBuilder
from densessl.pairs.registry import register_pair_builder

#: ``pairs.options.dates``: ``pair`` = the source's own pairs (xBD pre/post, every GeoTIFF pair)
DATE_MODES = ("pair", "adjacent", "any", "near_far")

#: one date pair of a source: (earlier raster id, its date, later raster id, its date)
DatePairKey = tuple[str, dt.date, str, dt.date]


def places_of(pairs: Sequence[DatePairKey]) -> list[int]:
    """Place of each pair: connected components of the rasters the pairs link (a pair joins
    two dates of one place), numbered by their first pair."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for a, _, b, _ in pairs:
        parent[find(a)] = find(b)
    first: dict[str, int] = {}
    return [first.setdefault(find(a), i) for i, (a, _, _, _) in enumerate(pairs)]


def date_candidates(pairs: Sequence[DatePairKey], mode: str, near_days: float = 120,
                    far_days: float = 365) -> dict[int, dict[str, list[int]]]:
    """For each place (numbered as :func:`places_of`), the pair indices ``dates`` may pick:
    ``{"near": [...], "far": [...]}`` (``far`` only for ``near_far``; a kind with no pair is
    left out).

    * ``adjacent``: the place's consecutive dates (rasters sorted by date, then id);
    * ``any``: every pair of the place;
    * ``near_far``: near = gap <= ``near_days``, far = gap >= ``far_days`` (gaps in between
      are not used); a place with neither is an error.
    """
    place = places_of(pairs)
    out: dict[int, dict[str, list[int]]] = {}
    if mode == "adjacent":
        rasters: dict[int, set] = {}
        for p, (a, da, b, db) in zip(place, pairs):
            rasters.setdefault(p, set()).update({(da, a), (db, b)})
        follows = {p: {x[1]: y[1] for x, y in zip(sorted(r), sorted(r)[1:])}
                   for p, r in rasters.items()}
    for i, (p, (a, da, b, db)) in enumerate(zip(place, pairs)):
        gap = abs((db - da).days)
        kinds = out.setdefault(p, {})
        if mode == "any":
            kinds.setdefault("near", []).append(i)
        elif mode == "adjacent":
            first, second = sorted([(da, a), (db, b)])
            if follows[p].get(first[1]) == second[1]:
                kinds.setdefault("near", []).append(i)
        elif mode == "near_far":
            if gap <= near_days:
                kinds.setdefault("near", []).append(i)
            if gap >= far_days:
                kinds.setdefault("far", []).append(i)
        else:
            raise PairContractError(f"pairs.options.dates: expected one of "
                                    f"{', '.join(DATE_MODES)}, got {mode!r}")
    for p, kinds in out.items():
        if not kinds:
            gaps = sorted({abs((db - da).days) for q, (_, da, _, db) in zip(place, pairs)
                           if q == p})
            wanted = (f"at most near_days {near_days} or at least far_days {far_days} apart"
                      if mode == "near_far" else "to use")
            raise PairContractError(
                f"pairs.options.dates {mode}: the place of {pairs[p][0]} has no date pair "
                f"{wanted} (its gaps in days: {gaps}); widen pairs.options.near_days / "
                "far_days, or use data.options.pairing: all")
    return out


@register_pair_builder("temporal")
class TemporalPairs(PairBuilder):
    """Source A = ``dataset[i]["image_t0"]``, source B = ``dataset[i]["image_t1"]``.

    ``valid_t0`` / ``valid_t1`` (H×W bool, optional) become ``valid_a`` / ``valid_b``, so a cell
    is a positive only where both dates have data. With probability ``swap_p`` the dates are
    exchanged (the query then comes from the later date); the draw uses torch's RNG, which
    DataLoader workers seed per worker, so runs stay reproducible.

    Series of more than two dates: with ``dates`` other than ``pair`` the builder chooses which
    two dates of a place form the pair, from a source that lists its date pairs
    (``date_pairs()``, e.g. ``geotiff``; xBD has two dates per place, so only ``pair``). Item
    ``index`` stays a tile of the place of the source's pair ``index % P``; the pair is drawn
    (torch's RNG, as the swap) among that place's candidates (:func:`date_candidates`):

    * ``adjacent``: two consecutive dates, weight 1;
    * ``any``: any two dates, weight 1;
    * ``near_far``: with probability ``far_p`` a *far* pair (dates at least ``far_days``
      apart) with ``pair_weight = far_weight``, else a *near* pair (at most ``near_days``
      apart) with weight 1; a place with only one kind always gives that kind.

    The weight multiplies the pair's terms in the dense, global and instance losses (a query
    cell of a far pair pulls its positive and pushes its negatives ``far_weight`` times as hard
    as one of a near pair; :func:`~densessl.losses.functional.weighted_info_nce`).

    Why weighted positives and not CACo's loss (Mall, Hariharan, Bala, "Change-Aware Sampling
    and Contrastive Learning for Satellite Images", CVPR 2023): CACo takes, per location, a
    short-term pair (dates within one year) and a long-term pair (years apart), estimates
    whether the location changed from the ratio of the long-term to the short-term feature
    distance (averaged with momentum over training and split in two by a Gaussian mixture),
    and treats the long-term image as a positive where nothing changed and as a negative where
    it did. That needs three images per sample, per-location state carried across steps and a
    mixture fit on the host, none of which the pair contract or the sync-free step has. The
    weighted form keeps CACo's premise — long-term pairs are less reliable positives than
    short-term ones, because real change accumulates — without estimating the change.

    Args:
        dataset: a source with temporal keys (``xbd``, ``xbd_labeled``, ``geotiff``).
        swap_p: probability of swapping the date order.
        dates: ``pair`` (the source's pairs as they are), ``adjacent``, ``any`` or
            ``near_far``.
        near_days, far_days: ``near_far`` gaps (days): near <= near_days < far_days <= far.
        far_p: ``near_far``: probability of a far pair where the place has both kinds.
        far_weight: ``near_far``: ``pair_weight`` of a far pair, in [0, 1].
    """

    def __init__(self, dataset: Dataset, swap_p: float = 0.5, dates: str = "pair",
                 near_days: float = 120, far_days: float = 365, far_p: float = 0.5,
                 far_weight: float = 0.5) -> None:
        if not 0.0 <= swap_p <= 1.0:
            raise PairContractError(f"pairs.options.swap_p must be in [0, 1], got {swap_p}")
        if dates not in DATE_MODES:
            raise PairContractError(f"pairs.options.dates: expected one of "
                                    f"{', '.join(DATE_MODES)}, got {dates!r}")
        if not 0 <= near_days < far_days:
            raise PairContractError(f"pairs.options.near_days ({near_days}) must be >= 0 and "
                                    f"below far_days ({far_days})")
        if not 0.0 <= far_p <= 1.0 or not 0.0 <= far_weight <= 1.0:
            raise PairContractError(f"pairs.options.far_p ({far_p}) and far_weight "
                                    f"({far_weight}) must be in [0, 1]")
        self.dataset, self.swap_p, self.dates = dataset, swap_p, dates
        self.far_p, self.far_weight = far_p, far_weight
        self.candidates: dict[int, dict[str, list[int]]] = {}
        if dates != "pair":
            if not hasattr(dataset, "date_pairs"):
                raise PairContractError(
                    f"pairs.options.dates: {dates} needs a source that lists the dates of each "
                    f"place (date_pairs(), e.g. geotiff); {type(dataset).__name__} does not "
                    "(xBD has two dates per place: use dates: pair)")
            self.pairs = list(dataset.date_pairs())
            self.place = places_of(self.pairs)
            self.candidates = date_candidates(self.pairs, dates, near_days, far_days)

    def __len__(self) -> int:
        return len(self.dataset)

    def choose(self, index: int) -> tuple[int, str]:
        """The source item to read for builder item ``index`` and the pair's kind (``near`` or
        ``far``): a tile of the same place, the pair drawn among its candidates."""
        count = len(self.pairs)
        kinds = self.candidates[self.place[index % count]]
        if "far" in kinds and "near" in kinds:
            kind = "far" if float(torch.rand(())) < self.far_p else "near"
        else:
            kind = "far" if "far" in kinds else "near"
        options = kinds[kind]
        pair = options[int(torch.randint(len(options), ()))]
        return pair + count * (index // count), kind

    def build(self, index: int) -> PairSample:
        weight, extra = None, {}
        if self.dates != "pair":
            index, kind = self.choose(index)
            _, early, _, late = self.pairs[index % len(self.pairs)]
            extra = {"dates": self.dates, "pair_kind": kind, "gap_days": (late - early).days}
            if self.dates == "near_far":
                weight = self.far_weight if kind == "far" else 1.0
        item = self.dataset[index]
        if "image_t0" not in item or "image_t1" not in item:
            raise PairContractError(
                f"temporal pairs need a source with 'image_t0' and 'image_t1' (e.g. xbd, "
                f"geotiff); {type(self.dataset).__name__} gives keys {sorted(item)}")
        a, b = item["image_t0"], item["image_t1"]
        valid_a, valid_b = item.get("valid_t0"), item.get("valid_t1")
        swapped = bool(self.swap_p > 0 and torch.rand(()) < self.swap_p)
        if swapped:
            a, b, valid_a, valid_b = b, a, valid_b, valid_a
        # a source that knows what changed between the dates (noisy-seg) marks those pixels:
        # analysis only (how loss.robust.kind treats changed cells), never read by a loss; one
        # pixel grid, so the mask holds for either date order. Every pair of such a source
        # carries its mask (all False at change 0), so batches always have one; the pair is
        # noisy when some change lies where both dates have data
        changed = item.get("changed_t0_t1")
        inside = changed
        for valid in (valid_a, valid_b):
            if inside is not None and valid is not None:
                inside = inside & valid.bool()
        noisy = inside is not None and bool(inside.any())
        return PairSample(source_a=a, source_b=b, valid_a=valid_a, valid_b=valid_b,
                          pair_weight=weight, noisy=noisy,
                          noise_mask_a=None if changed is None else changed.bool(),
                          meta=dict(item.get("meta", {}), builder="temporal", swapped=swapped,
                                    **extra))
