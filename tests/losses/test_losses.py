"""Losses: InfoNCE against a loop reference, the queue ring, dense and global contrast."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import identity_grid

from densessl.losses import (
    DenseContrast,
    GlobalContrast,
    MoCoQueue,
    contrastive_logits,
    info_nce,
    sample_cells,
)

# ---------------------------------------------------------------- reference


def reference_info_nce(query, positive, negatives_per_query, temperature):
    """Loop InfoNCE in float64: negatives_per_query[i] is a list of the negatives of query i."""
    losses = []
    for i in range(len(query)):
        q = np.asarray(query[i], dtype=np.float64)
        logits = [q @ np.asarray(positive[i], np.float64) / temperature]
        logits += [q @ np.asarray(n, np.float64) / temperature for n in negatives_per_query[i]]
        top = max(logits)
        log_sum_exp = top + math.log(sum(math.exp(v - top) for v in logits))
        losses.append(log_sum_exp - logits[0])
    return sum(losses) / len(losses)


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


# ---------------------------------------------------------------- functional


def test_info_nce_shared_negatives():
    q, p, negs = unit(5, 8, seed=1), unit(5, 8, seed=2), unit(7, 8, seed=3)
    expected = reference_info_nce(q.numpy(), p.numpy(), [negs.numpy()] * 5, 0.2)
    assert info_nce(q, p, negs, 0.2).item() == pytest.approx(expected, rel=1e-5)


def test_info_nce_per_query_negatives():
    q, p, negs = unit(4, 6, seed=1), unit(4, 6, seed=2), unit(4, 3, 6, seed=3)
    expected = reference_info_nce(q.numpy(), p.numpy(), list(negs.numpy()), 0.5)
    assert info_nce(q, p, negs, 0.5).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("per_query", [False, True])
def test_info_nce_masked_negatives_have_no_influence(per_query):
    q, p = unit(4, 6, seed=1), unit(4, 6, seed=2)
    negs = unit(4, 5, 6, seed=3) if per_query else unit(5, 6, seed=3)
    mask = torch.rand(4, 5, generator=torch.Generator().manual_seed(4)) > 0.4
    mask[0] = False  # a query with no allowed negative contributes exactly 0
    mask[:, 2] = False  # a shared negative nobody may use
    allowed = [
        [(negs[i, k] if per_query else negs[k]).numpy() for k in range(5) if mask[i, k]]
        for i in range(4)
    ]
    expected = reference_info_nce(q.numpy(), p.numpy(), allowed, 0.1)
    q.requires_grad_(True)
    negs.requires_grad_(True)
    loss = info_nce(q, p, negs, 0.1, neg_mask=mask)
    assert loss.item() == pytest.approx(expected, rel=1e-5)

    loss.backward()
    assert torch.isfinite(q.grad).all()
    assert (negs.grad[~mask] == 0).all() if per_query else (negs.grad[~mask.any(0)] == 0).all()

    # changing masked-out negatives changes nothing (for shared negatives: those masked for
    # every query)
    changed = negs.detach().clone()
    if per_query:
        changed[~mask] = -changed[~mask]
    else:
        changed[~mask.any(0)] = unit(int((~mask.any(0)).sum()), 6, seed=9)
    assert info_nce(q, p, changed, 0.1, neg_mask=mask).item() == pytest.approx(loss.item())


def test_info_nce_without_negatives_and_empty():
    q, p = unit(3, 4), unit(3, 4, seed=5)
    assert info_nce(q, p, None).item() == 0.0
    empty = torch.zeros(0, 4, requires_grad=True)
    loss = info_nce(empty, empty.detach(), unit(2, 4))
    loss.backward()
    assert loss.item() == 0.0 and empty.grad is not None
    assert contrastive_logits(q, p, unit(2, 4), 0.5).shape == (3, 3)


# ---------------------------------------------------------------- queue


def rows(start, count, dim=2):
    """Rows whose every entry is their running index, to read order back from the buffer."""
    return torch.arange(start, start + count, dtype=torch.float32)[:, None].repeat(1, dim)


def test_queue_fresh_is_empty():
    q = MoCoQueue(10, 2)
    keys, labels = q.get()
    assert keys.shape == (0, 2) and labels is None
    assert int(q.filled) == 0 and int(q.ptr) == 0


def test_queue_ring_wraps_for_batches_not_dividing_size():
    q = MoCoQueue(10, 2)
    q.enqueue(rows(0, 3))
    assert (int(q.ptr), int(q.filled)) == (3, 3)
    assert q.get()[0][:, 0].tolist() == [0, 1, 2]
    q.enqueue(rows(3, 4))
    assert (int(q.ptr), int(q.filled)) == (7, 7)
    assert q.get()[0][:, 0].tolist() == [0, 1, 2, 3, 4, 5, 6]
    q.enqueue(rows(7, 7))  # slots 7, 8, 9 then 0, 1, 2, 3
    assert (int(q.ptr), int(q.filled)) == (4, 10)
    assert q.get()[0][:, 0].tolist() == [10, 11, 12, 13, 4, 5, 6, 7, 8, 9]
    assert torch.equal(q.get()[0], q.keys)


def test_queue_more_rows_than_size_keeps_the_newest():
    q = MoCoQueue(5, 2)
    q.enqueue(rows(100, 2))
    q.enqueue(rows(0, 12))  # only 7..11 survive, as if written one by one from slot 2 on
    assert (int(q.ptr), int(q.filled)) == (4, 5)
    assert q.keys[:, 0].tolist() == [8, 9, 10, 11, 7]


def test_queue_labels_stay_aligned():
    q = MoCoQueue(4, 2, with_labels=True)
    assert q.labels.tolist() == [-1, -1, -1, -1]
    q.enqueue(rows(0, 3), torch.tensor([5, 6, 7]))
    q.enqueue(rows(3, 3), torch.tensor([8, 9, 10]))
    keys, labels = q.get()
    assert keys[:, 0].tolist() == [4, 5, 2, 3]
    assert labels.tolist() == [9, 10, 7, 8]
    with pytest.raises(ValueError):
        q.enqueue(rows(0, 2))  # labels missing
    with pytest.raises(ValueError):
        MoCoQueue(4, 2).enqueue(rows(0, 2), torch.tensor([1, 2]))


def test_queue_state_dict_round_trip():
    q = MoCoQueue(6, 3, with_labels=True)
    q.enqueue(unit(8, 3), torch.arange(8))
    sd = q.state_dict()
    assert set(sd) == {"keys", "labels", "ptr", "filled"}
    fresh = MoCoQueue(6, 3, with_labels=True)
    fresh.load_state_dict(sd)
    for name in ("keys", "labels", "ptr", "filled"):
        assert torch.equal(getattr(fresh, name), getattr(q, name))
    assert torch.equal(fresh.get()[0], q.get()[0])


def test_queue_stores_detached_copies():
    q = MoCoQueue(4, 2)
    src = torch.randn(3, 2, requires_grad=True)
    q.enqueue(src * 2)
    assert not q.keys.requires_grad and q.keys.grad_fn is None
    keys, _ = q.get()
    # get() hands out a copy: a later enqueue must not alter negatives already used in a loss
    q.enqueue(torch.zeros(2, 2))
    assert torch.equal(keys, (src * 2).detach())


def _gather_worker(rank, init_file, out_file):
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2
    )
    q = MoCoQueue(10, 2, with_labels=True)
    sizes = [[3, 0], [5, 2]][rank]  # unequal, even empty, contributions per process
    start = 100 * rank
    for m in sizes:
        q.enqueue(rows(start, m), torch.arange(start, start + m))
        start += m
    torch.save({k: v.clone() for k, v in q.state_dict().items()}, f"{out_file}.{rank}")
    torch.distributed.destroy_process_group()


def test_queue_gathered_equals_single_process(tmp_path):
    torch.multiprocessing.spawn(
        _gather_worker, args=(str(tmp_path / "init"), str(tmp_path / "sd")), nprocs=2
    )
    single = MoCoQueue(10, 2, with_labels=True)
    single.enqueue(torch.cat([rows(0, 3), rows(100, 5)]), torch.tensor([0, 1, 2, *range(100, 105)]))
    single.enqueue(torch.cat([rows(3, 0), rows(105, 2)]), torch.tensor([105, 106]))
    for rank in range(2):
        sd = torch.load(tmp_path / f"sd.{rank}")
        for name in ("labels", "ptr", "filled"):
            assert torch.equal(sd[name], getattr(single, name)), name
        assert torch.equal(sd["keys"][: int(sd["filled"])], single.get()[0])


# ---------------------------------------------------------------- dense contrast


def test_sample_cells_picks_distinct_valid_cells():
    torch.manual_seed(0)
    valid = torch.rand(3, 20) > 0.5
    valid[2] = False
    image, cell, keep = sample_cells(valid, 4)
    assert image.shape == cell.shape == keep.shape == (12,)  # fixed shapes: 3 images × 4
    assert (valid[image, cell] == keep).all()
    assert not keep[image == 2].any()
    for b in range(3):
        picked = cell[(image == b) & keep].tolist()
        assert len(picked) == min(4, int(valid[b].sum())) and len(set(picked)) == len(picked)


def test_dense_identity_pair_known_value():
    """k == q and identity grid: each positive logit is exactly 1/T; negatives are the other
    images' valid cells."""
    b, d, h, w, t = 3, 4, 2, 3, 0.2
    q_dense = torch.randn(b, d, h, w, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(b, h, w, dtype=torch.bool)
    valid[0, 1, 2] = valid[1, 0, 0] = False  # neither queries nor negatives
    loss_fn = DenseContrast(dim=d, queue_size=16, temperature=t, samples_per_image=h * w)
    loss, stats = loss_fn(q_dense, q_dense.clone(), identity_grid(b, h, w), valid)

    unit_q = F.normalize(q_dense, dim=1).double()
    cells = [(i, y, x) for i in range(b) for y in range(h) for x in range(w) if valid[i, y, x]]
    vec = {c: unit_q[c[0], :, c[1], c[2]].numpy() for c in cells}
    negs = [[vec[o] for o in cells if o[0] != c[0]] for c in cells]
    expected = reference_info_nce([vec[c] for c in cells], [vec[c] for c in cells], negs, t)

    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert int(stats["pairs"]) == len(cells)
    assert stats["pos_cos"].item() == pytest.approx(1.0, abs=1e-5)
    # the queue was fresh: the loss used no random initial keys, then got enqueued into
    assert int(stats["queue_filled"]) == 0
    assert int(loss_fn.queue.filled) == len(cells)  # enqueue_per_image=16 > cells per image


def test_dense_shifted_grid_with_queue_negatives():
    """A(i, j) ↔ B(i + 1, j + 2) on a non-square grid checks the (x, y) order of grid_ab."""
    b, d, h, w, t = 2, 3, 3, 4, 0.5
    g = torch.Generator().manual_seed(1)
    q_dense, k_dense = torch.randn(b, d, h, w, generator=g), torch.randn(b, d, h, w, generator=g)
    grid = identity_grid(b, h, w).roll(shifts=(-1, -2), dims=(1, 2))
    valid = torch.zeros(b, h, w, dtype=torch.bool)
    valid[:, : h - 1, : w - 2] = True
    loss_fn = DenseContrast(
        dim=d, queue_size=5, temperature=t, samples_per_image=100, batch_negatives=False
    )
    queue_keys = unit(5, d, seed=7)
    loss_fn.queue.enqueue(queue_keys)
    loss, _ = loss_fn(q_dense, k_dense, grid, valid)

    qn, kn = F.normalize(q_dense, dim=1), F.normalize(k_dense, dim=1)
    cells = [(i, y, x) for i in range(b) for y in range(h - 1) for x in range(w - 2)]
    expected = reference_info_nce(
        [qn[i, :, y, x].numpy() for i, y, x in cells],
        [kn[i, :, y + 1, x + 2].numpy() for i, y, x in cells],
        [queue_keys.numpy()] * len(cells),
        t,
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_dense_no_valid_cells_gives_connected_zero():
    q_dense = torch.randn(2, 4, 3, 3, requires_grad=True)
    loss_fn = DenseContrast(dim=4, queue_size=8)
    loss, stats = loss_fn(
        q_dense, torch.randn(2, 4, 3, 3), identity_grid(2, 3, 3), torch.zeros(2, 3, 3, dtype=bool)
    )
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert int(stats["pairs"]) == 0
    loss.backward()
    assert q_dense.grad is not None and (q_dense.grad == 0).all()
    assert int(loss_fn.queue.filled) == 0


def test_dense_gradient_reaches_q_but_not_through_queue():
    torch.manual_seed(0)
    loss_fn = DenseContrast(dim=4, queue_size=32, samples_per_image=8, enqueue_per_image=4)
    grid, valid = identity_grid(2, 4, 4), torch.ones(2, 4, 4, dtype=torch.bool)
    q1 = torch.randn(2, 4, 4, 4, requires_grad=True)
    k1 = torch.randn(2, 4, 4, 4, requires_grad=True)
    loss1, _ = loss_fn(q1, k1, grid, valid)
    assert int(loss_fn.queue.filled) == 8  # enqueued before backward ...
    loss1.backward()  # ... which must still work: negatives were copies
    assert q1.grad.abs().sum() > 0
    assert not loss_fn.queue.keys.requires_grad

    k1.grad = None
    q2 = torch.randn(2, 4, 4, 4, requires_grad=True)
    loss2, stats = loss_fn(q2, torch.randn(2, 4, 4, 4), grid, valid)
    loss2.backward()
    assert q2.grad.abs().sum() > 0
    assert k1.grad is None  # queued keys from step 1 carry no graph
    assert int(stats["queue_filled"]) == 8


def test_dense_eval_mode_leaves_queue_alone():
    loss_fn = DenseContrast(dim=4, queue_size=8).eval()
    x = torch.randn(1, 4, 2, 2)
    loss_fn(x, x, identity_grid(1, 2, 2), torch.ones(1, 2, 2, dtype=torch.bool))
    assert int(loss_fn.queue.filled) == 0


# ---------------------------------------------------------------- global contrast


def test_global_contrast_moco_v2():
    loss_fn = GlobalContrast(dim=4, queue_size=8, temperature=0.2)
    q1, k1 = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4)
    loss1, _ = loss_fn(q1, k1)
    assert loss1.item() == 0.0  # fresh queue: no negatives yet
    q2, k2 = torch.randn(2, 4), torch.randn(2, 4)
    loss2, stats = loss_fn(q2, k2)
    qn, kn, negs = F.normalize(q2, dim=1), F.normalize(k2, dim=1), F.normalize(k1, dim=1)
    expected = reference_info_nce(qn.numpy(), kn.numpy(), [negs.numpy()] * 2, 0.2)
    assert loss2.item() == pytest.approx(expected, rel=1e-5)
    assert int(stats["queue_filled"]) == 3 and int(loss_fn.queue.filled) == 5


def test_queue_of_size_zero_means_in_batch_negatives_only():
    queue = MoCoQueue(0, 4)
    queue.enqueue(torch.randn(3, 4))
    assert queue.get()[0].shape == (0, 4) and int(queue.filled) == 0
    dense = DenseContrast(4, queue_size=0, samples_per_image=4)
    q = torch.randn(2, 4, 2, 2, requires_grad=True)
    grid = identity_grid(2, 2, 2)
    loss, stats = dense(q, q.detach(), grid, torch.ones(2, 2, 2, dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(loss) and loss > 0 and int(stats["queue_filled"]) == 0


def test_grouped_logsumexp_matches_autograd():
    """The hand-written backward of the fused log-sum-exp equals autograd's, for queries and
    keys, with masked columns and several groups."""
    from densessl.losses.functional import MASKED_LOGIT, grouped_logsumexp

    g = torch.Generator().manual_seed(3)
    q = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.where(torch.rand(5, 6, generator=g) > 0.3, 0.0, MASKED_LOGIT).double()
    assert torch.autograd.gradcheck(lambda a, b: grouped_logsumexp(a, b, bias, 0.5, 2), (q, k))
    reference = (bias + q @ k.T / 0.5).reshape(5, 3, 2).logsumexp(2)
    torch.testing.assert_close(grouped_logsumexp(q, k, bias, 0.5, 3), reference)
