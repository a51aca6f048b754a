"""Robust positives (issue #18): RINCE and loss truncation in the dense and instance InfoNCE,
against float64 loop references, with one queue and per-class rings, padding rows, the q → 0
limit, gradcheck, the truncation warm-up, recipe checks and the noisy-pair detection monitor."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import identity_grid, robust_monitor_host

from densessl.errors import RecipeError
from densessl.losses import DenseContrast, InstanceContrast
from densessl.losses.functional import pairwise_negatives, ring_negatives, weighted_info_nce
from densessl.losses.robust import (
    RobustPositives,
    rince_per_query,
    robust_loss_terms,
    truncation_fraction_at,
)
from densessl.methods.dense_pretraining import DensePretraining
from densessl.recipe import parse_recipe

T = 0.2


# ---------------------------------------------------------------- float64 loop reference


def allowed(query_label: int, key_label: int) -> bool:
    """A key may be a negative unless it shares the query's (known) class."""
    return query_label < 0 or key_label < 0 or query_label != key_label


def reference_loss(queries, positives, negatives, weights, kind="none", q=0.5, lam=0.01,
                   fraction=0.0):
    """Plain loops in float64: negatives[i] lists query i's negatives; weight 0 = padding.

    Returns (loss, indices of the dropped queries)."""
    per_query, pos_logits = [], []
    for i, query in enumerate(queries):
        query = np.asarray(query, np.float64)
        s_pos = float(query @ np.asarray(positives[i], np.float64)) / T
        s_neg = [float(query @ np.asarray(n, np.float64)) / T for n in negatives[i]]
        total = math.exp(s_pos) + sum(math.exp(s) for s in s_neg)
        if kind == "rince":
            value = -math.exp(q * s_pos) / q + (lam * total) ** q / q
        else:
            value = math.log(total) - s_pos
        per_query.append(value)
        pos_logits.append(s_pos)
    dropped = set()
    if kind == "truncate":
        candidates = [i for i in range(len(queries)) if weights[i] > 0]
        candidates.sort(key=lambda i: (pos_logits[i], i))  # explicit sort, lowest first
        dropped = set(candidates[:math.floor(fraction * len(candidates))])
    kept = [weights[i] if i not in dropped else 0.0 for i in range(len(queries))]
    loss = sum(w * v for w, v in zip(kept, per_query)) / max(sum(kept), 1.0)
    return loss, dropped


def unit_np(tensor):
    return F.normalize(tensor.double(), dim=-1).numpy()


# ---------------------------------------------------------------- dense objective

ROBUST = {
    "none": RobustPositives("none"),
    "rince": RobustPositives("rince", rince_q=0.5, rince_lambda=0.05),
    "rince_q1": RobustPositives("rince", rince_q=1.0, rince_lambda=0.01),
    "truncate": RobustPositives("truncate", truncate_fraction=0.3),
}


def dense_case(robust: RobustPositives, per_class: bool, step: int = 0, seed: int = 0):
    """DenseContrast on random maps with a pre-filled queue and some invalid cells (padding
    slots, weight 0), and the same loss from the loop reference."""
    g = torch.Generator().manual_seed(seed)
    b, d, h, w, classes, size = 3, 8, 3, 4, 3, 12
    q_dense = torch.randn(b, d, h, w, generator=g)
    k_dense = q_dense + 0.8 * torch.randn(b, d, h, w, generator=g)
    valid = torch.rand(b, h, w, generator=g) > 0.25
    class_map = torch.randint(-1, classes, (b, h, w), generator=g) if per_class else None
    loss_fn = DenseContrast(dim=d, queue_size=size, temperature=T, samples_per_image=h * w,
                            enqueue_per_image=0, num_classes=classes if per_class else None,
                            robust=robust)
    # 7 of 12 slots written (per ring): the other slots must not act as negatives
    queued = F.normalize(torch.randn(7 * (classes + 1), d, generator=g), dim=1)
    queued_labels = torch.arange(7 * (classes + 1)) % (classes + 1) - 1
    if per_class:
        loss_fn.queue.enqueue(queued, queued_labels)
    else:
        queued, queued_labels = queued[:7], torch.full((7,), -1)
        loss_fn.queue.enqueue(queued)
    loss, stats = loss_fn(q_dense, k_dense, identity_grid(b, h, w), valid, class_map,
                          step=step)

    # the reference: every slot of every image, in the order DenseContrast keeps them
    # (image-major, cells increasing), invalid cells as weight-0 padding rows
    cells = [(i, y, x) for i in range(b) for y in range(h) for x in range(w)]
    label = {c: int(class_map[c]) if per_class else -1 for c in cells}
    qv = {c: unit_np(q_dense[c[0], :, c[1], c[2]]) for c in cells}
    kv = {c: unit_np(k_dense[c[0], :, c[1], c[2]]) for c in cells}
    negatives = []
    for c in cells:
        negs = [unit_np(k) for k, lab in zip(queued, queued_labels.tolist())
                if allowed(label[c], lab)]
        negs += [kv[o] for o in cells
                 if o[0] != c[0] and valid[o] and allowed(label[c], label[o])]
        negatives.append(negs)
    weights = [1.0 if valid[c] else 0.0 for c in cells]
    fraction = truncation_fraction_at(step, robust.truncate_fraction,
                                      robust.truncate_warmup_steps)
    expected, dropped = reference_loss([qv[c] for c in cells], [kv[c] for c in cells],
                                       negatives, weights, robust.kind, robust.rince_q,
                                       robust.rince_lambda, fraction)
    return loss, stats, expected, dropped, weights, loss_fn


@pytest.mark.parametrize("per_class", [False, True], ids=["one_queue", "per_class"])
@pytest.mark.parametrize("name", sorted(ROBUST))
def test_dense_robust_matches_loop_reference(name, per_class):
    loss, stats, expected, dropped, weights, loss_fn = dense_case(ROBUST[name], per_class)
    assert loss.item() == pytest.approx(expected, rel=2e-5, abs=1e-6)
    assert stats["pairs"].item() == sum(weights)
    if name == "none":
        assert "robust_fraction" not in stats and loss_fn.last_robust_cells is None
    if name == "truncate":
        assert len(dropped) == math.floor(0.3 * sum(weights)) > 0
        assert stats["robust_fraction"].item() == pytest.approx(len(dropped) / sum(weights))
        # per image: the dropped slots of that image, and its valid cells
        per_image = loss_fn.last_robust_cells
        n = len(weights) // 3
        assert per_image["down"].tolist() == [
            float(sum(1 for j in dropped if j // n == i)) for i in range(3)]
        assert per_image["cells"].tolist() == [sum(weights[i * n:(i + 1) * n]) for i in range(3)]


def test_dense_truncation_warmup_ramps_the_dropped_fraction():
    robust = RobustPositives("truncate", truncate_fraction=0.4, truncate_warmup_steps=10)
    dropped_counts = []
    for step in (0, 5, 10, 50):
        loss, stats, expected, dropped, weights, _ = dense_case(robust, False, step=step)
        assert loss.item() == pytest.approx(expected, rel=2e-5)
        dropped_counts.append(len(dropped))
    valid = sum(weights)
    assert dropped_counts == [0, math.floor(0.2 * valid), math.floor(0.4 * valid),
                              math.floor(0.4 * valid)]
    # step 0 of the warm-up is plain InfoNCE
    plain, *_ = dense_case(RobustPositives("none"), False)
    warm, *_ = dense_case(robust, False, step=0)
    assert warm.item() == plain.item()


def test_truncation_schedule():
    expected = [0.3 * min(1.0, s / 4) for s in range(7)]
    assert [truncation_fraction_at(s, 0.3, 4) for s in range(7)] == pytest.approx(expected)
    assert truncation_fraction_at(0, 0.3, 0) == 0.3  # no warm-up: all at once


# ---------------------------------------------------------------- instance objective


@pytest.mark.parametrize("queue", ["single", "per_class"])
@pytest.mark.parametrize("name", ["rince", "rince_q1", "truncate"])
def test_instance_robust_matches_loop_reference(name, queue):
    g = torch.Generator().manual_seed(1)
    n, d, classes, size = 10, 8, 3, 6
    q = torch.randn(n, d, generator=g)
    k = q + torch.randn(n, d, generator=g)
    labels = torch.randint(-1, classes, (n,), generator=g)
    loss_fn = InstanceContrast(dim=d, queue_size=size, temperature=T, queue=queue,
                               num_classes=classes, robust=ROBUST[name])
    queued = F.normalize(torch.randn(4 * (classes + 1), d, generator=g), dim=1)
    queued_labels = torch.arange(4 * (classes + 1)) % (classes + 1) - 1
    if queue == "per_class":
        loss_fn.queue.enqueue(queued, queued_labels)
    else:
        queued, queued_labels = queued[:4], torch.full((4,), -1)
        loss_fn.queue.enqueue(queued)
    loss, stats = loss_fn(q, k, labels, update_queue=False)

    lab = labels.tolist() if queue == "per_class" else [-1] * n
    negatives = []
    for i in range(n):
        negs = [unit_np(key) for key, kl in zip(queued, queued_labels.tolist())
                if allowed(lab[i], kl)]
        negs += [unit_np(k[j]) for j in range(n) if j != i and allowed(lab[i], lab[j])]
        negatives.append(negs)
    robust = ROBUST[name]
    expected, dropped = reference_loss(unit_np(q), unit_np(k), negatives, [1.0] * n,
                                       robust.kind, robust.rince_q, robust.rince_lambda,
                                       robust.truncate_fraction)
    assert loss.item() == pytest.approx(expected, rel=2e-5, abs=1e-6)
    if name == "truncate":
        assert stats["robust_fraction"].item() == pytest.approx(len(dropped) / n)
    assert "down_weighted" not in stats


# ---------------------------------------------------------------- limits and gradients


def test_rince_q_to_zero_is_info_nce_plus_log_lambda():
    """RINCE → InfoNCE + log λ as q → 0 (Chuang et al. 2022), loss and gradient."""
    g = torch.Generator().manual_seed(2)
    n, d, lam = 12, 8, 0.05
    query = torch.randn(n, d, generator=g, requires_grad=True)
    positive = F.normalize(torch.randn(n, d, generator=g), dim=1)
    keys = F.normalize(torch.randn(2, 9, d, generator=g), dim=2)
    key_valid = torch.rand(2, 9, generator=g) > 0.3
    weight = (torch.rand(n, generator=g) > 0.2).float()  # padding rows too

    def loss_of(robust):
        qn = F.normalize(query, dim=1)
        terms = [ring_negatives(qn, keys, key_valid, torch.ones(n, 2, dtype=torch.bool), T,
                                weight),
                 pairwise_negatives(qn, positive, ~torch.eye(n, dtype=torch.bool), T, weight)]
        loss, _ = weighted_info_nce(qn, positive, terms, T, weight, robust)
        grad, = torch.autograd.grad(loss, query)
        return loss.item(), grad

    plain, plain_grad = loss_of(None)
    rince, rince_grad = loss_of(RobustPositives("rince", rince_q=1e-6, rince_lambda=lam))
    assert rince - math.log(lam) == pytest.approx(plain, abs=2e-4)
    torch.testing.assert_close(rince_grad, plain_grad, atol=2e-4, rtol=1e-3)


def test_rince_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    pos = torch.randn(6, dtype=torch.float64, generator=g).requires_grad_()
    lse = (pos.detach() + torch.rand(6, dtype=torch.float64, generator=g) * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda p, s: rince_per_query(p, s, 0.5, 0.02), (pos, lse))


@pytest.mark.parametrize("kind", ["rince", "truncate"])
def test_robust_terms_gradcheck_from_similarities(kind):
    """The whole robust mean from raw float64 embeddings: positive logit and log-sum-exp over
    positive and negatives, padding rows weighted 0."""
    g = torch.Generator().manual_seed(4)
    query = torch.randn(7, 5, dtype=torch.float64, generator=g).requires_grad_()
    positive = torch.randn(7, 5, dtype=torch.float64, generator=g)
    negatives = torch.randn(9, 5, dtype=torch.float64, generator=g)
    weight = torch.tensor([1, 1, 0, 1, 1, 1, 0], dtype=torch.float64)
    robust = RobustPositives(kind, rince_q=0.7, rince_lambda=0.1, truncate_fraction=0.4)

    def mean_loss(q):
        qn = F.normalize(q, dim=1)
        pos = (qn * F.normalize(positive, dim=1)).sum(1) / T
        neg = qn @ F.normalize(negatives, dim=1).T / T
        lse = torch.cat([pos[:, None], neg], dim=1).logsumexp(1)
        per_query, w, _ = robust_loss_terms(pos, lse, weight, robust)
        return (per_query * w).sum() / w.sum()

    assert torch.autograd.gradcheck(mean_loss, (query,))


# ---------------------------------------------------------------- recipe


@pytest.mark.parametrize("key,value", [("rince_q", 0), ("rince_q", 1.5), ("rince_q", -0.1),
                                       ("rince_lambda", 0), ("rince_lambda", 2.0),
                                       ("truncate_fraction", 1.0),
                                       ("truncate_fraction", -0.1),
                                       ("truncate_warmup_steps", -1), ("kind", "huber")])
def test_recipe_rejects_bad_robust_values(key, value):
    with pytest.raises(RecipeError, match=rf"loss\.robust\.{key}: .*got {value!r}") as info:
        parse_recipe({"loss": {"robust": {"kind": "rince", key: value}}})
    assert "\n" not in str(info.value)


def test_recipe_robust_defaults():
    loss = parse_recipe({}).loss
    robust = loss.robust
    assert (robust.kind, robust.rince_q, robust.rince_lambda, robust.truncate_fraction,
            robust.truncate_warmup_steps) == ("none", 0.5, 0.01, 0.1, 0)
    RobustPositives(robust.kind, robust.rince_q, robust.rince_lambda, robust.truncate_fraction,
                    robust.truncate_warmup_steps)


# ---------------------------------------------------------------- noisy-pair detection


def noisy_batch(seed=5):
    """8 pairs, 2 noisy: their B view is unrelated (positives dissimilar), the clean pairs'
    B is A plus a little noise; some cells invalid."""
    g = torch.Generator().manual_seed(seed)
    b, d, h, w = 8, 16, 4, 4
    noisy = torch.zeros(b, dtype=torch.bool)
    noisy[[2, 5]] = True
    q_dense = torch.randn(b, d, h, w, generator=g)
    k_dense = q_dense + 0.2 * torch.randn(b, d, h, w, generator=g)
    k_dense[noisy] = -q_dense[noisy] + torch.randn(2, d, h, w, generator=g)
    valid = torch.ones(b, h, w, dtype=torch.bool)
    valid[:, 0, 0] = False
    valid[5, 1] = False
    return q_dense, k_dense, identity_grid(b, h, w), valid, noisy


def detection(robust, batch):
    q_dense, k_dense, grid, valid, noisy = batch
    loss_fn = DenseContrast(dim=q_dense.shape[1], queue_size=0, temperature=T,
                            samples_per_image=16, enqueue_per_image=0, robust=robust)
    loss_fn(q_dense, k_dense, grid, valid)
    host = robust_monitor_host(loss_fn)
    logs = DensePretraining.robust_detection(host, SimpleNamespace(noisy=noisy,
                                                                   noise_mask_a=None))
    return logs["dense_robust_precision"].item(), logs["dense_robust_recall"].item()


def test_truncation_singles_out_the_noisy_pairs():
    batch = noisy_batch()
    valid, noisy = batch[3], batch[4]
    noisy_cells = int(valid[noisy].sum())  # 15 + 11
    total = int(valid.sum())
    fraction = noisy_cells / total + 1e-9  # exactly as many cells as the noisy pairs have
    precision, recall = detection(RobustPositives("truncate", truncate_fraction=fraction),
                                  batch)
    assert (precision, recall) == (1.0, 1.0)
    # dropping twice as many: every noisy cell, then the lowest clean ones
    precision, recall = detection(RobustPositives("truncate", truncate_fraction=0.5), batch)
    assert recall == 1.0
    assert precision == pytest.approx(noisy_cells / math.floor(0.5 * total))
    # RINCE's down-weighted cells (e^{q s+} under half the batch mean) are the noisy ones too
    precision, recall = detection(RobustPositives("rince", rince_q=0.5), batch)
    assert precision == 1.0 and recall > 0.9


def test_detection_counts_accumulate_over_the_run():
    batch = noisy_batch()
    q_dense, k_dense, grid, valid, noisy = batch
    loss_fn = DenseContrast(dim=16, queue_size=0, temperature=T, samples_per_image=16,
                            enqueue_per_image=0,
                            robust=RobustPositives("truncate", truncate_fraction=0.5))
    host = robust_monitor_host(loss_fn)
    loss_fn(q_dense, k_dense, grid, valid)
    DensePretraining.robust_detection(host, SimpleNamespace(noisy=noisy, noise_mask_a=None))
    # second step: no pair is noisy, so the truncated cells are all clean
    loss_fn(q_dense, k_dense, grid, valid)
    clean = SimpleNamespace(noisy=torch.zeros(8, dtype=torch.bool), noise_mask_a=None)
    logs = DensePretraining.robust_detection(host, clean)
    noisy_cells, down = int(valid[noisy].sum()), math.floor(0.5 * int(valid.sum()))
    assert logs["dense_robust_precision"].item() == pytest.approx(noisy_cells / (2 * down))
    assert logs["dense_robust_recall"].item() == 1.0


def test_sweep_summary_shows_the_detection_monitors(tmp_path):
    """summary.md carries the robust monitors next to the headline metrics, mean ± std in %."""
    from densessl.sweep.report import write_summary

    rows = [{"cell_id": f"c{seed}", "status": "ok", "error": "", "seconds": 1.0,
             "loss.robust.kind": "truncate", "seed": seed,
             "pretrain/dense_robust_precision": p, "pretrain/dense_robust_recall": r}
            for seed, (p, r) in enumerate([(0.8, 0.4), (0.6, 0.2)])]
    write_summary(tmp_path, rows, ["loss.robust.kind", "seed"], {"x": None, "over": ["seed"]})
    table = (tmp_path / "summary.md").read_text()
    assert "pretrain/dense_robust_precision" in table and "pretrain/dense_robust_recall" in table
    std = 100 * math.sqrt(2 * 0.1**2)  # sample std of two values 0.2 apart
    assert f"| truncate | 2 | 70.0 ± {std:.1f} | 30.0 ± {std:.1f} |" in table
