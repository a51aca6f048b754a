"""``loss.robust.kind: rank`` (issue #26): a query is dropped when more than ``rank_threshold``
of its own allowed negatives beat its positive. Checked against a float64 brute-force loop over the
queries (ranks counted by hand from q, k⁺ and the allowed negatives), the warm-up, masked
negatives and padding rows, gradients, recipe checks and the noisy-pair monitor."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import fake_step, identity_grid, make_sync_free, robust_monitor_host

from densessl.errors import RecipeError
from densessl.losses import DenseContrast, InstanceContrast, functional
from densessl.losses.functional import (
    NegativeTerm,
    pairwise_negatives,
    ring_negatives,
    weighted_info_nce,
)
from densessl.losses.robust import (
    RobustPositives,
    rank_threshold_at,
    robust_loss_terms,
)
from densessl.methods.dense_pretraining import DensePretraining
from densessl.methods.monitors import RANK_BINS, rank_separation
from densessl.recipe import parse_recipe

T = 0.2


def unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def allowed(query_label: int, key_label: int) -> bool:
    return query_label < 0 or key_label < 0 or query_label != key_label


def brute_force(queries, positives, negatives, weights, threshold):
    """Loops in float64: query i is dropped iff weight > 0, it has allowed negatives and
    #{n : q·n > q·k⁺} / #negatives > threshold. Returns (dropped set, InfoNCE mean over the
    kept weighted queries, rank fractions)."""
    dropped, fractions, terms = set(), [], []
    for i, q in enumerate(queries):
        s_pos = float(q @ positives[i])
        sims = [float(q @ n) for n in negatives[i]]
        above = sum(1 for s in sims if s > s_pos)
        fraction = above / len(sims) if sims else 0.0
        fractions.append(fraction)
        if weights[i] > 0 and sims and fraction > threshold:
            dropped.add(i)
        total = math.exp(s_pos / T) + sum(math.exp(s / T) for s in sims)
        terms.append(math.log(total) - s_pos / T)
    kept = [0.0 if i in dropped else w for i, w in enumerate(weights)]
    loss = sum(w * t for w, t in zip(kept, terms)) / max(sum(kept), 1.0)
    return dropped, loss, fractions


def dense_case(robust: RobustPositives, per_class: bool, step: int = 0, seed: int = 0):
    """DenseContrast on random maps, some images' keys unrelated (wrong pairs), a part-filled
    queue and invalid cells; and the loop reference over every slot."""
    g = torch.Generator().manual_seed(seed)
    b, d, h, w, classes, size = 4, 8, 3, 4, 3, 12
    q_dense = torch.randn(b, d, h, w, generator=g)
    k_dense = q_dense + 0.5 * torch.randn(b, d, h, w, generator=g)
    k_dense[1] = torch.randn(d, h, w, generator=g)  # a wrong pair: its positives are random
    valid = torch.rand(b, h, w, generator=g) > 0.25
    class_map = torch.randint(-1, classes, (b, h, w), generator=g) if per_class else None
    loss_fn = DenseContrast(dim=d, queue_size=size, temperature=T, samples_per_image=h * w,
                            enqueue_per_image=0, num_classes=classes if per_class else None,
                            robust=robust)
    queued = F.normalize(torch.randn(7 * (classes + 1), d, generator=g), dim=1)
    queued_labels = torch.arange(7 * (classes + 1)) % (classes + 1) - 1
    if per_class:
        loss_fn.queue.enqueue(queued, queued_labels)
    else:  # 7 of 12 slots written: the other 5 must not count
        queued, queued_labels = queued[:7], torch.full((7,), -1)
        loss_fn.queue.enqueue(queued)
    loss, stats = loss_fn(q_dense, k_dense, identity_grid(b, h, w), valid, class_map,
                          step=step)

    cells = [(i, y, x) for i in range(b) for y in range(h) for x in range(w)]
    label = {c: int(class_map[c]) if per_class else -1 for c in cells}
    qv = {c: unit(q_dense[c[0], :, c[1], c[2]].double()) for c in cells}
    kv = {c: unit(k_dense[c[0], :, c[1], c[2]].double()) for c in cells}
    negatives = []
    for c in cells:
        negs = [unit(k.double()) for k, lab in zip(queued, queued_labels.tolist())
                if allowed(label[c], lab)]
        negs += [kv[o] for o in cells
                 if o[0] != c[0] and valid[o] and allowed(label[c], label[o])]
        negatives.append(negs)
    weights = [1.0 if valid[c] else 0.0 for c in cells]
    threshold = rank_threshold_at(step, robust.rank_threshold, robust.truncate_warmup_steps)
    dropped, expected, fractions = brute_force([qv[c] for c in cells], [kv[c] for c in cells],
                                               negatives, weights, threshold)
    return loss, stats, loss_fn, dropped, expected, weights, fractions


@pytest.mark.parametrize("threshold", [0.2, 0.5])
@pytest.mark.parametrize("per_class", [False, True], ids=["one_queue", "per_class"])
def test_dense_rank_matches_brute_force(per_class, threshold):
    robust = RobustPositives("rank", rank_threshold=threshold)
    loss, stats, loss_fn, dropped, expected, weights, _ = dense_case(robust, per_class)
    slot_down = loss_fn.last_robust_cells["slot_down"]
    assert set(torch.nonzero(slot_down).flatten().tolist()) == dropped
    # a real test: some dropped, some kept, and the wrong pair (image 1) dropped most
    n = len(weights) // 4
    assert 0 < len(dropped) < sum(weights)
    per_image = [sum(1 for j in dropped if j // n == i) for i in range(4)]
    assert per_image[1] == max(per_image)
    assert loss.item() == pytest.approx(expected, rel=2e-5, abs=1e-6)
    assert stats["robust_fraction"].item() == pytest.approx(len(dropped) / sum(weights))
    assert loss_fn.last_robust_cells["down"].tolist() == [float(c) for c in per_image]


def auroc_loop(wrong: list[float], clean: list[float]) -> float:
    """Mann-Whitney over every (wrong, clean) pair of binned scores, ties half."""
    def binned(v):
        return min(int(v * RANK_BINS), RANK_BINS - 1)
    wins = sum(1.0 if binned(a) > binned(c) else 0.5 if binned(a) == binned(c) else 0.0
               for a in wrong for c in clean)
    return wins / (len(wrong) * len(clean))


@pytest.mark.parametrize("per_class", [False, True], ids=["one_queue", "per_class"])
def test_rank_score_and_its_separation_match_loops(per_class):
    """The score the criterion thresholds (``slot_rank``) is the brute-force rank fraction of
    every query cell, and the run's dense_robust_rank_* monitors (means and AUROC of wrong vs
    clean cells, accumulated over two batches) are those of a pairwise loop."""
    robust = RobustPositives("rank", rank_threshold=0.5)
    wrong_scores, clean_scores = [], []
    for seed in (0, 1):
        _, _, loss_fn, _, _, weights, fractions = dense_case(robust, per_class, seed=seed)
        score = loss_fn.last_robust_cells["slot_rank"]
        kept = [i for i, w in enumerate(weights) if w > 0]
        assert score[kept].double().numpy() == pytest.approx([fractions[i] for i in kept],
                                                             abs=1e-6)
        n = len(weights) // 4
        noisy = torch.tensor([False, True, False, False])  # image 1 is the wrong pair
        wrong_scores += [fractions[i] for i in kept if i // n == 1]
        clean_scores += [fractions[i] for i in kept if i // n != 1]
        if seed == 0:
            host = robust_monitor_host(loss_fn)
        else:
            host.dense_loss = loss_fn
        logs = DensePretraining.robust_detection(host, SimpleNamespace(noisy=noisy,
                                                                       noise_mask_a=None))
    assert logs["dense_robust_rank_wrong"].item() == pytest.approx(np.mean(wrong_scores),
                                                                   abs=1e-6)
    assert logs["dense_robust_rank_clean"].item() == pytest.approx(np.mean(clean_scores),
                                                                   abs=1e-6)
    assert logs["dense_robust_rank_auroc"].item() == pytest.approx(
        auroc_loop(wrong_scores, clean_scores), abs=1e-6)
    assert logs["dense_robust_rank_auroc"].item() > 0.6  # the wrong pair's positives rank low


def test_rank_separation_extremes():
    """Perfect separation is 1, reversed 0, identical distributions 0.5, no wrong cell NaN."""
    apart = torch.zeros(2, RANK_BINS)
    apart[0, -1], apart[1, 0] = 3, 5
    sums = torch.tensor([3.0, 0.0])
    assert rank_separation(apart, sums)["dense_robust_rank_auroc"].item() == 1.0
    assert rank_separation(apart.flip(0), sums)["dense_robust_rank_auroc"].item() == 0.0
    same = torch.ones(2, RANK_BINS)
    assert rank_separation(same, sums)["dense_robust_rank_auroc"].item() == pytest.approx(0.5)
    none_wrong = torch.zeros(2, RANK_BINS)
    none_wrong[1, 3] = 4
    assert math.isnan(rank_separation(none_wrong, sums)["dense_robust_rank_auroc"].item())


def test_instance_rank_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    n, d, classes, size = 12, 8, 3, 6
    q = torch.randn(n, d, generator=g)
    k = q + 0.6 * torch.randn(n, d, generator=g)
    k[[2, 7]] = torch.randn(2, d, generator=g)
    labels = torch.randint(-1, classes, (n,), generator=g)
    robust = RobustPositives("rank", rank_threshold=0.3)
    loss_fn = InstanceContrast(dim=d, queue_size=size, temperature=T, queue="per_class",
                               num_classes=classes, robust=robust)
    queued = F.normalize(torch.randn(4 * (classes + 1), d, generator=g), dim=1)
    queued_labels = torch.arange(4 * (classes + 1)) % (classes + 1) - 1
    loss_fn.queue.enqueue(queued, queued_labels)
    loss, stats = loss_fn(q, k, labels, update_queue=False)

    lab = labels.tolist()
    negatives = []
    for i in range(n):
        negs = [unit(key.double()) for key, kl in zip(queued, queued_labels.tolist())
                if allowed(lab[i], kl)]
        negs += [unit(k[j].double()) for j in range(n) if j != i and allowed(lab[i], lab[j])]
        negatives.append(negs)
    dropped, expected, _ = brute_force([unit(x.double()) for x in q],
                                       [unit(x.double()) for x in k], negatives, [1.0] * n, 0.3)
    assert 0 < len(dropped) < n
    assert loss.item() == pytest.approx(expected, rel=2e-5, abs=1e-6)
    assert stats["robust_fraction"].item() == pytest.approx(len(dropped) / n)


# ---------------------------------------------------------------- warm-up


def test_rank_threshold_schedule():
    assert [rank_threshold_at(s, 0.3, 4) for s in range(7)] == pytest.approx(
        [1.0, 0.825, 0.65, 0.475, 0.3, 0.3, 0.3])
    assert rank_threshold_at(0, 0.3, 0) == 0.3  # no warm-up: at once


def test_rank_warmup_is_respected():
    robust = RobustPositives("rank", rank_threshold=0.2, truncate_warmup_steps=10)
    plain, *_ = dense_case(RobustPositives("none"), False)
    counts = []
    for step in (0, 5, 10, 50):
        loss, stats, loss_fn, dropped, expected, weights, fractions = dense_case(
            robust, False, step=step)
        slot_down = loss_fn.last_robust_cells["slot_down"]
        assert set(torch.nonzero(slot_down).flatten().tolist()) == dropped
        assert loss.item() == pytest.approx(expected, rel=2e-5, abs=1e-6)
        counts.append(len(dropped))
        if step == 0:  # threshold 1: nothing dropped, plain InfoNCE
            assert dropped == set() and loss.item() == plain.item()
            assert max(fractions) > 0.6  # ... though some queries would be after warm-up
    assert counts[0] <= counts[1] <= counts[2] == counts[3] and counts[2] > counts[1] > 0


# ---------------------------------------------------------------- masked negatives, padding


def rank_terms(query, positive, keys, key_valid, ring_allowed, batch_allowed, weight):
    return [ring_negatives(query, keys, key_valid, ring_allowed, T, weight),
            pairwise_negatives(query, positive, batch_allowed, T, weight)]


def test_masked_negatives_never_count_and_padding_is_never_dropped():
    """Every disallowed negative (unwritten queue slot, disallowed ring, masked batch key) is a
    copy of the query itself (cosine 1, beats any positive): counted, it would drop every
    query. Padding rows with an unrelated positive are never dropped either."""
    g = torch.Generator().manual_seed(3)
    n, d, r, k = 6, 8, 2, 5
    query = F.normalize(torch.randn(n, d, generator=g), dim=1)
    positive = F.normalize(query + 0.1 * torch.randn(n, d, generator=g), dim=1)
    positive[4] = -query[4]  # padding row with the worst possible positive
    weight = torch.tensor([1.0, 1, 1, 1, 0, 1])
    # ring 0: 3 written far keys, 2 unwritten copies of query 0; ring 1 disallowed for all
    keys = F.normalize(torch.randn(r, k, d, generator=g), dim=2)
    keys[0, :3] = -F.normalize(torch.randn(3, d, generator=g) + 3 * query[0], dim=1)
    keys[0, 3:] = query[0]
    keys[1] = query[0]
    key_valid = torch.tensor([[True] * 3 + [False] * 2, [True] * k])
    ring_allowed = torch.tensor([[True, False]] * n)
    batch_allowed = torch.zeros(n, n, dtype=torch.bool)  # no batch negative allowed...
    terms = rank_terms(query, positive, keys, key_valid, ring_allowed, batch_allowed, weight)
    above, count = (sum(t) for t in zip(*(term.rank_counts((query * positive).sum(1))
                                          for term in terms)))
    assert count.tolist() == [3.0] * n
    robust = RobustPositives("rank", rank_threshold=0.01)
    loss, stats = weighted_info_nce(query, positive, terms, T, weight, robust)
    assert not stats["down_weighted"][4]  # padding
    expected = [float(above[i]) / 3 > 0.01 and weight[i] > 0 for i in range(n)]
    assert stats["down_weighted"].tolist() == expected
    # query 0 vs far keys only: its positive wins, it is kept
    assert not stats["down_weighted"][0]


@pytest.mark.parametrize("block", [None, 100], ids=["one_block", "row_blocks"])
def test_rank_counts_match_brute_force_exactly(block, monkeypatch):
    """The per-query counts themselves, many negatives (so some lie close to the positive),
    three rings with random validity and permissions, random batch masks; also with the CPU
    row blocks small enough that every block is a few rows."""
    if block is not None:
        monkeypatch.setattr(functional, "_CPU_BLOCK", block)
    g = torch.Generator().manual_seed(6)
    n, d, r, k = 24, 6, 3, 40
    query = F.normalize(torch.randn(n, d, generator=g), dim=1)
    positive = F.normalize(query + torch.randn(n, d, generator=g), dim=1)
    keys = F.normalize(torch.randn(r, k, d, generator=g), dim=2)
    key_valid = torch.rand(r, k, generator=g) > 0.3
    ring_allowed = torch.rand(n, r, generator=g) > 0.3
    # the batch keys are the positives; a query's own positive is never its negative
    batch_allowed = (torch.rand(n, n, generator=g) > 0.4) & ~torch.eye(n, dtype=torch.bool)
    weight = torch.ones(n)
    terms = rank_terms(query, positive, keys, key_valid, ring_allowed, batch_allowed, weight)
    pos_cos = (query * positive).sum(1)
    above, count = (sum(t) for t in zip(*(term.rank_counts(pos_cos) for term in terms)))
    qd, pd, kd = query.double().numpy(), positive.double().numpy(), keys.double().numpy()
    close = 0
    for i in range(n):
        s_pos = float(qd[i] @ pd[i])
        sims = [float(qd[i] @ kd[ring, j]) for ring in range(r) for j in range(k)
                if ring_allowed[i, ring] and key_valid[ring, j]]
        sims += [float(qd[i] @ pd[j]) for j in range(n) if batch_allowed[i, j]]
        assert count[i].item() == len(sims)
        assert above[i].item() == sum(1 for s in sims if s > s_pos)
        close += sum(1 for s in sims if 0 < abs(s - s_pos) < 1e-2)
    assert close > 0  # the comparison is exercised near the positive


def test_no_allowed_negative_is_never_dropped():
    query = F.normalize(torch.randn(4, 6), dim=1)
    positive = -query  # the worst positive, but nothing to rank it against
    weight = torch.ones(4)
    terms = [ring_negatives(query, torch.zeros(1, 0, 6), torch.zeros(1, 0, dtype=torch.bool),
                            torch.ones(4, 1, dtype=torch.bool), T, weight),
             pairwise_negatives(query, positive, torch.zeros(4, 4, dtype=torch.bool), T,
                                weight)]
    _, stats = weighted_info_nce(query, positive, terms, T, weight,
                                 RobustPositives("rank", rank_threshold=0.1))
    assert not stats["down_weighted"].any()


def test_rank_needs_the_counts():
    with pytest.raises(ValueError, match="rank_counts"):
        weighted_info_nce(torch.ones(2, 3), torch.ones(2, 3),
                          [NegativeTerm(torch.zeros(2), torch.zeros(()), torch.zeros(()))], T,
                          robust=RobustPositives("rank"))
    with pytest.raises(ValueError, match="rank"):
        robust_loss_terms(torch.zeros(2), torch.ones(2), torch.ones(2), RobustPositives("rank"))


# ---------------------------------------------------------------- gradients


def test_dropped_queries_get_no_gradient_and_the_rest_plain_info_nce():
    """Documented weights: a dropped query has weight 0 (no gradient, not in the mean); the
    kept ones get exactly InfoNCE's gradient with the mean over the kept ones."""
    g = torch.Generator().manual_seed(4)
    n, d = 10, 8
    raw = torch.randn(n, d, generator=g)
    positive = F.normalize(raw + 0.3 * torch.randn(n, d, generator=g), dim=1)
    positive[[1, 6]] = F.normalize(-raw[[1, 6]] + torch.randn(2, d, generator=g), dim=1)
    keys = F.normalize(torch.randn(1, 16, d, generator=g), dim=2)
    valid = torch.ones(1, 16, dtype=torch.bool)

    def run(robust, weight):
        query = raw.clone().requires_grad_()
        qn = F.normalize(query, dim=1)
        rings = torch.ones(n, 1, dtype=torch.bool)
        terms = [ring_negatives(qn, keys, valid, rings, T, weight),
                 pairwise_negatives(qn, positive, ~torch.eye(n, dtype=torch.bool), T, weight)]
        loss, stats = weighted_info_nce(qn, positive, terms, T, weight, robust)
        grad, = torch.autograd.grad(loss, query)
        return loss, grad, stats

    loss, grad, stats = run(RobustPositives("rank", rank_threshold=0.25), torch.ones(n))
    down = stats["down_weighted"]
    assert down[[1, 6]].all() and 0 < int(down.sum()) < n
    assert (grad[down] == 0).all() and (grad[~down].abs().sum(1) > 0).all()
    plain_loss, plain_grad, _ = run(None, (~down).float())
    assert loss.item() == pytest.approx(plain_loss.item(), rel=1e-6)
    torch.testing.assert_close(grad, plain_grad)


# ---------------------------------------------------------------- recipe and monitor


@pytest.mark.parametrize("value", [0, 1.0, -0.1, 1.5])
def test_recipe_rejects_bad_rank_threshold(value):
    with pytest.raises(RecipeError, match=rf"loss\.robust\.rank_threshold: .*got {value!r}"):
        parse_recipe({"loss": {"robust": {"kind": "rank", "rank_threshold": value}}})
    with pytest.raises(ValueError, match="rank_threshold"):
        RobustPositives("rank", rank_threshold=value)


def test_recipe_rank_defaults():
    loss = parse_recipe({"loss": {"robust": {"kind": "rank"}}}).loss
    assert (loss.robust.kind, loss.robust.rank_threshold) == ("rank", 0.5)
    assert RobustPositives("rank").rank_threshold == loss.robust.rank_threshold


def test_rank_singles_out_the_noisy_pairs():
    """8 pairs, 2 noisy (B unrelated to A), through DenseContrast and the precision / recall
    monitor of DensePretraining, unchanged."""
    g = torch.Generator().manual_seed(5)
    b, d, h, w = 8, 16, 4, 4
    noisy = torch.zeros(b, dtype=torch.bool)
    noisy[[2, 5]] = True
    q_dense = torch.randn(b, d, h, w, generator=g)
    k_dense = q_dense + 0.2 * torch.randn(b, d, h, w, generator=g)
    k_dense[noisy] = torch.randn(2, d, h, w, generator=g)
    valid = torch.ones(b, h, w, dtype=torch.bool)
    valid[:, 0, 0] = False
    loss_fn = DenseContrast(dim=d, queue_size=0, temperature=T, samples_per_image=16,
                            enqueue_per_image=0, robust=RobustPositives("rank",
                                                                        rank_threshold=0.2))
    loss_fn(q_dense, k_dense, identity_grid(b, h, w), valid)
    host = robust_monitor_host(loss_fn)
    logs = DensePretraining.robust_detection(host, SimpleNamespace(noisy=noisy,
                                                                   noise_mask_a=None))
    assert logs["dense_robust_precision"].item() == 1.0
    assert logs["dense_robust_recall"].item() > 0.6


@pytest.mark.parametrize("queue", ["single", "per_class"])
def test_rank_training_step_has_no_host_sync(queue):
    """The whole step under FakeTensorMode (as tests/methods/test_sync_free_step.py): the rank
    counts, the threshold and the monitor read no tensor value on the host."""
    from helpers import pair_batch

    from densessl.bench.training import bench_recipe

    torch.manual_seed(0)
    extra = {"queue": "per_class", "num_classes": 12} if queue == "per_class" else {}
    recipe = bench_recipe("resnet18", 64, 4, instance={"weight": 1.0, "queue_size": 8},
                          dense={"queue_size": 16},
                          robust={"kind": "rank", "truncate_warmup_steps": 4}, **extra)
    batch = pair_batch(recipe, torch.device("cpu"), with_instances=True)
    task = DensePretraining(recipe)
    make_sync_free(task)
    task.compute_losses(batch)
    fake_step(task, batch)


def test_recipe_rank_threshold_reaches_the_dense_objective():
    # the recipe's value, not RobustPositives' default, must be what the loss applies
    from densessl.methods.dense_pretraining import DensePretraining
    from densessl.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "same_image.yaml",
                         ["loss.robust.kind=rank", "loss.robust.rank_threshold=0.3"])
    task = DensePretraining(recipe)
    assert task.dense_loss.robust.kind == "rank"
    assert task.dense_loss.robust.rank_threshold == 0.3
