"""Issue #18, the rest: change-aware temporal pairs from series of more than two dates
(``pairs.options.dates``) with a per-pair loss weight, the per-cell noise mask of
``partial_change`` and the per-cell precision / recall it gives, and the sweep's robust-vs-plain
plot. References are independent: brute force over the dates, float64 loops for the weighted
losses, the replaced pixels read back from unique pixel values."""

from __future__ import annotations

import datetime as dt
import itertools
import math
import re
import statistics
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
from helpers import (
    UniquePixels,
    check_noise_mask_on_view_cells,
    fake_step,
    identity_grid,
    make_sync_free,
    robust_monitor_host,
)

from densessl.data.geotiff import GeoTiffPairs
from densessl.data.geotiff_synth import (
    SERIES_CHANGE_AFTER,
    SERIES_DATES,
    synthesize_geotiff_series,
)
from densessl.errors import PairContractError
from densessl.losses import DenseContrast, InstanceContrast
from densessl.losses.functional import NegativeTerm, weighted_info_nce
from densessl.losses.robust import RobustPositives
from densessl.methods import DensePretraining
from densessl.pairs import NoisyPairs, TemporalPairs, collate_pairs
from densessl.pairs.temporal import date_candidates, places_of
from densessl.sweep.report import robust_bars, write_summary

T = 0.2


def day(text: str) -> dt.date:
    return dt.datetime.strptime(text, "%Y%m%d").date()


# ---------------------------------------------------------------- near / far date picking


def random_series(seed: int) -> list[tuple[str, dt.date, str, dt.date]]:
    """Three places with 3-6 dates at random gaps; every pair of dates of a place (pairing:
    all), places interleaved as a source might list them."""
    rng = np.random.default_rng(seed)
    pairs = []
    for place in range(3):
        days = np.cumsum(rng.integers(10, 300, rng.integers(3, 7)))
        files = [(f"p{place}_{d}.tif", dt.date(2018, 1, 1) + dt.timedelta(int(d)))
                 for d in days]
        pairs += [(a, da, b, db) for (a, da), (b, db) in itertools.combinations(files, 2)]
    order = rng.permutation(len(pairs))
    return [pairs[i] for i in order]


def place_name(path: str) -> str:
    return Path(path).name.split("_")[0]


def brute_force(pairs, mode, near_days, far_days):
    """Per place (named by its file prefix): the pairs each kind may use, from the dates
    alone."""
    out = {}
    for i, (a, da, b, db) in enumerate(pairs):
        place = place_name(a)
        dates = sorted({(d, f) for (x, d, y, e) in pairs for (f, d) in ((x, d), (y, e))
                        if place_name(f) == place})
        gap = abs((db - da).days)
        kinds = out.setdefault(place, {"near": set(), "far": set()})
        if mode == "any":
            kinds["near"].add(i)
        elif mode == "adjacent":
            position = {f: k for k, (_, f) in enumerate(dates)}
            if abs(position[a] - position[b]) == 1:
                kinds["near"].add(i)
        else:
            if gap <= near_days:
                kinds["near"].add(i)
            if gap >= far_days:
                kinds["far"].add(i)
    return {p: {k: v for k, v in kinds.items() if v} for p, kinds in out.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", ["any", "adjacent", "near_far"])
def test_date_candidates_match_brute_force(seed, mode):
    pairs = random_series(seed)
    expected = brute_force(pairs, mode, near_days=150, far_days=365)
    got = date_candidates(pairs, mode, near_days=150, far_days=365)
    place = places_of(pairs)
    named = {pairs[p][0].split("_")[0]: {k: set(v) for k, v in kinds.items()}
             for p, kinds in got.items()}
    assert named == expected
    # every pair's place is the place of its files
    for i, (a, _, b, _) in enumerate(pairs):
        assert pairs[place[i]][0].split("_")[0] == a.split("_")[0] == b.split("_")[0]


def test_a_place_without_usable_gaps_is_refused():
    pairs = [("a_1", day("20200101"), "a_2", day("20200601"))]  # 152 days: neither kind
    with pytest.raises(PairContractError, match=r"a_1 has no date pair at most near_days "
                                                r"120 or at least far_days 365 apart.*\[152\]"):
        date_candidates(pairs, "near_far", 120, 365)


class SeriesSource(torch.utils.data.Dataset):
    """A source listing its date pairs; item i is pair i % P, its pixels say which."""

    def __init__(self, pairs, tiles=4):
        self.pairs, self.tiles = pairs, tiles

    def date_pairs(self):
        return self.pairs

    def __len__(self):
        return len(self.pairs) * self.tiles

    def __getitem__(self, index):
        pair = index % len(self.pairs)
        image = torch.full((1, 8, 8), float(pair))
        return {"image_t0": image, "image_t1": image.clone(),
                "meta": {"pair": pair, "tile": index // len(self.pairs)}}


def test_builder_draws_among_the_candidates_with_the_far_weight():
    pairs = random_series(3)
    source = SeriesSource(pairs)
    builder = TemporalPairs(source, swap_p=0.0, dates="near_far", near_days=150,
                            far_days=365, far_p=0.3, far_weight=0.25)
    expected = brute_force(pairs, "near_far", 150, 365)
    torch.manual_seed(0)
    far = 0
    draws = 0
    for index in range(len(builder)):
        for _ in range(10):
            sample = builder[index]
            pair = sample.meta["pair"]
            assert sample.meta["tile"] == index // len(pairs)  # same tile slot, same place
            place = pairs[index % len(pairs)][0].split("_")[0]
            kind = sample.meta["pair_kind"]
            assert pair in expected[place][kind]
            assert sample.pair_weight == (0.25 if kind == "far" else 1.0)
            _, da, _, db = pairs[pair]
            assert sample.meta["gap_days"] == (db - da).days
            both = len(expected[place]) == 2
            far += kind == "far" and both
            draws += both
    assert draws > 100 and abs(far / draws - 0.3) < 0.06


def test_dates_need_a_source_that_lists_them():
    class TwoDates(torch.utils.data.Dataset):
        def __len__(self):
            return 1

    with pytest.raises(PairContractError, match="needs a source that lists the dates"):
        TemporalPairs(TwoDates(), dates="near_far")
    with pytest.raises(PairContractError, match="pairs.options.dates: expected one of"):
        TemporalPairs(SeriesSource(random_series(0)), dates="closest")


# ---------------------------------------------------------------- synthetic series


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory):
    return synthesize_geotiff_series(tmp_path_factory.mktemp("series"), 2, seed=0, size=72)


def read(path):
    with rasterio.open(path) as src:
        return src.read().astype(np.float64), src.crs.to_epsg()


def test_synthetic_series_has_seasonal_and_abrupt_change(tmp_path):
    """Same season a year apart: only the slow drift on one side of the abrupt change, new
    buildings and a cleared field across it; a season apart: the fields' NIR moves."""
    dates = ("20190301", "20190601", "20200301", "20200601", "20210301", "20210601")
    root = synthesize_geotiff_series(tmp_path, 1, seed=4, size=72, dates=dates,
                                     change_after=3)
    images = {}
    for d in dates:
        data, epsg = read(root / f"site-a_{d}.tif")
        if epsg == 32633:  # the second date is in Web Mercator: another pixel grid
            images[d] = data / 10000
    assert len(images) == len(dates) - 1
    both = np.all([(x > 0).all(0) for x in images.values()], axis=0)  # inside every swath

    def moved(a, b):  # share of pixels whose reflectance moved by more than 0.05
        return (np.abs(images[a] - images[b]).max(0) > 0.05)[both].mean()

    same_side = moved("20190301", "20200301")  # both before the change: drift only (< 2 %)
    across = moved("20200601", "20210601")  # straddles the change (after date 3)
    assert same_side < 0.005 and across > 0.03
    assert moved("20190301", "20200601") > across  # a season apart *and* across: more still
    # seasonal: NIR of the fields is higher in June than in March, every year
    nir = {d: x[3][both].mean() for d, x in images.items()}
    assert nir["20200601"] > nir["20200301"] and nir["20210601"] > nir["20210301"]
    # the three-date and eight-date writers share the ground: same first date pixels
    assert len(SERIES_DATES) == 8 and 0 <= SERIES_CHANGE_AFTER < 7


def test_geotiff_source_lists_its_date_pairs(series_dir, tmp_path):
    source = GeoTiffPairs(str(series_dir), image_size=32, channels=4,
                          pattern=r"(?P<place>.+)_(?P<date>\d{8})\.tif$", tiles_per_pair=2,
                          stats_path=str(tmp_path / "stats.json"))
    listed = source.date_pairs()
    n = len(SERIES_DATES)
    assert len(listed) == 2 * n * (n - 1) // 2
    for a, da, b, db in listed:
        assert da < db and re.search(da.strftime("%Y%m%d"), a) and db.strftime("%Y%m%d") in b
    builder = TemporalPairs(source, dates="near_far", near_days=100, far_days=365)
    expected = brute_force(listed, "near_far", 100, 365)
    torch.manual_seed(1)
    for index in range(0, len(builder), 7):
        sample = builder[index]
        place = place_name(listed[index % len(listed)][0])
        files = (sample.meta["t0"], sample.meta["t1"])
        matching = [i for i, (a, _, b, _) in enumerate(listed) if {a, b} == set(files)]
        assert matching and matching[0] in expected[place][sample.meta["pair_kind"]]


# ---------------------------------------------------------------- weighted losses, float64


def reference_info_nce(q, k, negatives, weight, pair_weight):
    """Σ_i w_i p_i (lse_i − s_i⁺) / max(Σ w_i, 1) by a loop in float64; ``negatives[i]`` are
    query i's negative keys."""
    total, norm = 0.0, 0.0
    for i in range(q.shape[0]):
        pos = float(q[i] @ k[i]) / T
        logits = [pos] + [float(q[i] @ n) / T for n in negatives[i]]
        top = max(logits)
        lse = top + math.log(sum(math.exp(x - top) for x in logits))
        total += weight[i] * pair_weight[i] * (lse - pos)
        norm += weight[i]
    return total / max(norm, 1.0)


def test_weighted_info_nce_pair_weight_matches_float64():
    g = torch.Generator().manual_seed(0)
    n, m, d = 6, 5, 8
    q = F.normalize(torch.randn(n, d, generator=g), dim=1)
    k = F.normalize(torch.randn(n, d, generator=g), dim=1)
    keys = F.normalize(torch.randn(m, d, generator=g), dim=1)
    weight = torch.tensor([1.0, 1, 0, 1, 1, 1])
    pw = torch.tensor([1.0, 0.5, 0.7, 0.0, 0.25, 1.0])
    lse = torch.logsumexp(q @ keys.T / T, dim=1)
    term = NegativeTerm(lse, torch.zeros(()), torch.ones(()))
    loss, _ = weighted_info_nce(q, k, [term], T, weight, pair_weight=pw)
    expected = reference_info_nce(q.double(), k.double(), [keys.double()] * n,
                                  weight.tolist(), pw.tolist())
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    plain, _ = weighted_info_nce(q, k, [term], T, weight)
    ones, _ = weighted_info_nce(q, k, [term], T, weight, pair_weight=torch.ones(n))
    assert plain.item() == ones.item()


def test_dense_loss_pair_weight_matches_float64():
    g = torch.Generator().manual_seed(1)
    b, d, h, w = 3, 8, 2, 3
    q_dense = torch.randn(b, d, h, w, generator=g)
    k_dense = torch.randn(b, d, h, w, generator=g)
    valid = torch.ones(b, h, w, dtype=torch.bool)
    valid[1, 0, 0] = False
    pw = torch.tensor([1.0, 0.5, 0.2])
    loss_fn = DenseContrast(dim=d, queue_size=0, temperature=T, samples_per_image=h * w,
                            enqueue_per_image=0)
    loss, _ = loss_fn(q_dense, k_dense, identity_grid(b, h, w), valid, pair_weight=pw)
    # every valid cell is a query; negatives: the other images' valid cells' keys
    qs = F.normalize(q_dense.double().flatten(2).transpose(1, 2), dim=2)
    ks = F.normalize(k_dense.double().flatten(2).transpose(1, 2), dim=2)
    flat = valid.flatten(1)
    rows, negs, weights, pws = [], [], [], []
    for i in range(b):
        for c in range(h * w):
            if not flat[i, c]:
                continue
            rows.append((qs[i, c], ks[i, c]))
            negs.append([ks[j, e] for j in range(b) if j != i for e in range(h * w)
                         if flat[j, e]])
            weights.append(1.0)
            pws.append(float(pw[i]))
    q = torch.stack([r[0] for r in rows])
    k = torch.stack([r[1] for r in rows])
    expected = reference_info_nce(q, k, negs, weights, pws)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_instance_loss_pair_weight_matches_float64():
    g = torch.Generator().manual_seed(2)
    n, d = 5, 8
    q = torch.randn(n, d, generator=g)
    k = torch.randn(n, d, generator=g)
    pw = torch.tensor([1.0, 0.5, 0.5, 0.1, 1.0])
    loss_fn = InstanceContrast(dim=d, queue_size=0, temperature=T)
    loss, _ = loss_fn(q, k, update_queue=False, pair_weight=pw)
    qn, kn = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
    negs = [[kn[j] for j in range(n) if j != i] for i in range(n)]
    expected = reference_info_nce(qn, kn, negs, [1.0] * n, pw.tolist())
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- partial_change noise mask


def replaced(clean, noisy):
    """Pixels of B whose value changed: UniquePixels gives every pixel of every sample its
    own value, so a replaced pixel always differs."""
    return (clean.source_b != noisy.source_b).any(0)


def patches_of(mask, patch):
    """The patch grid cells the mask covers; each must be covered entirely or not at all."""
    h, w = mask.shape
    cells = set()
    for r in range(0, h, patch):
        for c in range(0, w, patch):
            block = mask[r:r + patch, c:c + patch]
            assert block.all() or not block.any()
            if block.all():
                cells.add((r // patch, c // patch))
    return cells


@pytest.mark.parametrize("amount", [0.0, 0.3, 0.75])
def test_partial_change_mask_is_the_replaced_patches(amount):
    source = UniquePixels(20)
    noisy = NoisyPairs(source, "partial_change", amount, patch=8, seed=3)
    for index in range(6):
        sample, clean = noisy[index], source[index]
        truth = replaced(clean, sample)
        assert torch.equal(sample.noise_mask_a, truth)
        covered = patches_of(truth, 8)
        assert len(covered) * 64 == int(truth.sum())
        assert abs(len(covered) / 16 - amount) <= 1 / 32 + 1e-9
        assert sample.noisy == (amount > 0)


class FlippedPairs(UniquePixels):
    """B is A mirrored left-right; the base correspondence says so."""

    def build(self, index):
        sample = super().build(index)
        sample.source_b = sample.source_a.flip(-1).clone()
        ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        sample.base_grid = torch.stack([31 - xs, ys], -1)
        return sample


def test_partial_change_mask_follows_the_base_correspondence():
    source = FlippedPairs(10)
    noisy = NoisyPairs(source, "partial_change", 0.4, patch=8, seed=1)
    sample, clean = noisy[2], source[2]
    truth_b = replaced(clean, sample)
    assert torch.equal(sample.noise_mask_a, truth_b.flip(-1))  # a pixel's point in B: mirrored


def test_noise_mask_reaches_the_view_cells():
    source = UniquePixels(12)
    noisy = NoisyPairs(source, "partial_change", 0.5, patch=8, seed=0)
    samples = [noisy[i] for i in range(4)]
    batch = collate_pairs(samples)
    assert batch.noise_mask_a.shape == (4, 32, 32)
    _, checked = check_noise_mask_on_view_cells(
        batch, [sample.noise_mask_a for sample in samples], channels=2, size=32)
    assert checked > 200


def test_cell_precision_recall_against_the_true_cells():
    """Two noisy pairs, only the top half of their cells replaced (dissimilar keys there):
    truncating exactly that many cells is perfect per cell, while the pair-level recall
    (every cell of a noisy pair counted as wrong) is one half."""
    g = torch.Generator().manual_seed(5)
    b, d, h, w = 8, 16, 4, 4
    noisy = torch.zeros(b, dtype=torch.bool)
    noisy[[2, 5]] = True
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    mask[[2, 5], :2] = True
    q_dense = torch.randn(b, d, h, w, generator=g)
    k_dense = q_dense + 0.2 * torch.randn(b, d, h, w, generator=g)
    k_dense = torch.where(mask[:, None], -q_dense + torch.randn(b, d, h, w, generator=g),
                          k_dense)
    valid = torch.ones(b, h, w, dtype=torch.bool)
    fraction = int(mask.sum()) / (b * h * w) + 1e-9
    loss_fn = DenseContrast(dim=d, queue_size=0, temperature=T, samples_per_image=16,
                            enqueue_per_image=0,
                            robust=RobustPositives("truncate", truncate_fraction=fraction))
    loss_fn(q_dense, k_dense, identity_grid(b, h, w), valid)
    host = robust_monitor_host(loss_fn)
    logs = DensePretraining.robust_detection(host, SimpleNamespace(noisy=noisy,
                                                                   noise_mask_a=mask))
    assert logs["dense_robust_cell_precision"].item() == 1.0
    assert logs["dense_robust_cell_recall"].item() == 1.0
    assert logs["dense_robust_precision"].item() == 1.0
    assert logs["dense_robust_recall"].item() == 0.5
    # brute force over the slots: the dropped cells are exactly the masked ones
    cells = loss_fn.last_robust_cells
    dropped = {(s // 16, int(c)) for s, (c, down) in
               enumerate(zip(cells["slot_cell"], cells["slot_down"])) if down}
    assert dropped == {(i, c) for i in range(b) for c in range(h * w)
                       if mask[i].flatten()[c]}
    # without a mask the cell-level numbers are the pair-level ones
    host.robust_counts.zero_()
    logs = DensePretraining.robust_detection(host, SimpleNamespace(noisy=noisy,
                                                                   noise_mask_a=None))
    assert logs["dense_robust_cell_recall"].item() == logs["dense_robust_recall"].item()


def test_step_with_pair_weights_and_noise_mask_has_no_host_sync():
    from helpers import pair_batch

    from densessl.bench.training import bench_recipe

    torch.manual_seed(0)
    recipe = bench_recipe("resnet18", 64, 4, instance={"weight": 1.0, "queue_size": 8},
                          dense={"queue_size": 16}, robust={"kind": "truncate"})
    batch = pair_batch(recipe, torch.device("cpu"), with_instances=True)
    batch.pair_weight = torch.tensor([1.0, 0.5, 1.0, 0.5])
    batch.noise_mask_a = torch.rand(batch.valid_ab.shape) > 0.5
    batch.noisy = torch.tensor([False, True, False, True])
    task = DensePretraining(recipe)
    make_sync_free(task)
    task.compute_losses(batch)
    fake_step(task, batch)


# ---------------------------------------------------------------- pretraining, Python API


def test_pretrain_on_a_series_with_near_far_dates(series_dir, tmp_path):
    from densessl.workflows.pretraining import pretrain

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "geotiff_temporal.yaml"
    metrics = pretrain(recipe, tmp_path / "run", overrides=[
        f"data.path={series_dir}", f"data.options.stats_path={tmp_path / 'stats.json'}",
        "data.options.tiles_per_pair=1", "data.image_size=48",
        "pairs.options.dates=near_far", "pairs.options.far_weight=0.5",
        "pairs.options.near_days=100", "pairs.options.far_days=365",
        "train.max_steps=2", "train.batch_size=4", "model.split_bn_groups=2",
        "train.num_workers=0", "augment.view_size=32", "model.neck_dim=32",
        "model.dense_dim=32", "model.global_dim=32"], progress=False)
    assert metrics["steps"] == 2
    assert math.isfinite(metrics["final"]["loss"]) and metrics["final"]["loss"] > 0
    # the recipe's builder gives near pairs weight 1 and far pairs 0.5, batched
    from densessl.build import build_pair_builder
    from densessl.recipe import load_recipe

    builder = build_pair_builder(load_recipe(tmp_path / "run" / "recipe.yaml"))
    torch.manual_seed(0)
    batch = collate_pairs([builder[i] for i in range(0, len(builder), 5)])
    kinds = [m["pair_kind"] for m in batch.meta]
    assert batch.pair_weight.tolist() == [0.5 if k == "far" else 1.0 for k in kinds]
    assert {"near", "far"} <= set(kinds)


# ---------------------------------------------------------------- robust vs plain plot


def fake_rows():
    """A sweep table: noise none / mismatch 0.5 / partial_change 0.5 × robust none / rince /
    truncate × seeds 0, 1, with a metric that depends on all three."""
    rows = []
    base = {"none": 0.6, "mismatch": 0.4, "partial_change": 0.5}
    bonus = {"none": 0.0, "rince": 0.05, "truncate": 0.08}
    for kind, robust, seed in itertools.product(base, bonus, (0, 1)):
        rows.append({"cell_id": f"{kind}-{robust}-{seed}", "status": "ok", "error": "",
                     "seconds": 1.0, "noise.kind": kind,
                     "noise.amount": 0.0 if kind == "none" else 0.5, "loss.robust.kind": robust,
                     "seed": seed,
                     "pretrained/linear_probe/mIoU": base[kind] + bonus[robust] + 0.01 * seed,
                     "random/linear_probe/mIoU": 0.3})
    return rows, base, bonus


def test_robust_plot_is_written_with_one_bar_series_per_robust_value(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    rows, base, bonus = fake_rows()
    closed = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (closed.append(fig), real_close(fig)))
    keys = ["noise.kind", "noise.amount", "loss.robust.kind", "seed"]
    paths = write_summary(tmp_path, rows, keys, {"x": "noise.amount", "over": ["seed"]})
    plot = tmp_path / "plots" / "robust_pretrained_linear_probe_mIoU.png"
    assert plot in paths and plot.stat().st_size > 1000
    figure = next(f for f in closed if f._suptitle is None and "loss.robust.kind" in
                  f.axes[0].get_title())
    ax = figure.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["kind=none, amount=0.0", "kind=mismatch, amount=0.5",
                      "kind=partial_change, amount=0.5"]
    bars = {c.get_label(): c for c in ax.containers if hasattr(c, "patches")}
    assert sorted(bars) == ["robust=none", "robust=rince", "robust=truncate"]
    for robust in bonus:
        heights = [p.get_height() for p in bars[f"robust={robust}"].patches]
        for kind, height in zip(base, heights):
            values = [base[kind] + bonus[robust] + 0.01 * s for s in (0, 1)]
            assert height == pytest.approx(100 * statistics.mean(values))
        # error bars: mean ± sample std over the two seeds
        container = bars[f"robust={robust}"].errorbar
        segments = container.lines[2][0].get_segments()
        for kind, segment in zip(base, segments):
            values = [base[kind] + bonus[robust] + 0.01 * s for s in (0, 1)]
            assert segment[1][1] - segment[0][1] == pytest.approx(
                200 * statistics.stdev(values))


def test_robust_bars_mark_missing_cells():
    rows, _, _ = fake_rows()
    rows = [r for r in rows
            if not (r["noise.kind"] == "mismatch" and r["loss.robust.kind"] == "rince")]
    from densessl.sweep.report import summarize

    summary = summarize(rows, ["noise.kind", "noise.amount", "loss.robust.kind", "seed"])
    groups, series = robust_bars(summary, ["noise.kind", "noise.amount", "loss.robust.kind"],
                                 "pretrained/linear_probe/mIoU")
    assert math.isnan(series["rince"][groups.index("kind=mismatch, amount=0.5")][0])
    assert not math.isnan(series["none"][groups.index("kind=mismatch, amount=0.5")][0])
