"""PerClassQueue against a brute-force reference, and the per-class dense loss's masking."""

import pytest
import torch
import torch.nn.functional as F

from densessl.losses import DenseContrast, PerClassDenseContrast, PerClassQueue
from densessl.losses.functional import info_nce


class ReferenceQueues:
    """One Python list per class, written key by key: the obvious (slow) semantics."""

    def __init__(self, num_classes, size):
        self.size = size
        self.rings = {c: [None] * size for c in list(range(num_classes)) + [-1]}
        self.ptr = dict.fromkeys(self.rings, 0)
        self.filled = dict.fromkeys(self.rings, 0)

    def enqueue(self, keys, labels):
        for key, label in zip(keys, labels.tolist()):
            self.rings[label][self.ptr[label]] = key
            self.ptr[label] = (self.ptr[label] + 1) % self.size
            self.filled[label] = min(self.filled[label] + 1, self.size)

    def entries(self):
        out = []
        for label, ring in self.rings.items():
            out += [(label, k) for k in ring[: self.filled[label]]]
        return out


def _as_set(keys, labels):
    return sorted((int(lab), tuple(k.round(decimals=5).tolist())) for k, lab in zip(keys, labels))


def test_matches_reference_with_wraparound_and_unknown():
    torch.manual_seed(0)
    queue, ref = PerClassQueue(num_classes=4, size=5, dim=3), ReferenceQueues(4, 5)
    batches = [torch.tensor([0, 1, 1, -1]), torch.tensor([1] * 7 + [2, -1, 0]),  # class 1 wraps
               torch.tensor([3, 3, -1, -1, -1, -1, -1, 2]), torch.tensor([], dtype=torch.long),
               torch.tensor([0, 0, 0, 0, 0, 0, 1])]
    for labels in batches:
        keys = torch.randn(len(labels), 3)
        queue.enqueue(keys, labels)
        ref.enqueue(keys, labels)
        got_keys, got_labels = queue.get()
        expected = [(lab, tuple(k.round(decimals=5).tolist())) for lab, k in ref.entries()]
        assert _as_set(got_keys, got_labels) == sorted(expected)
        for label in ref.rings:
            slot = 4 if label == -1 else label
            assert queue.ptr[slot] == ref.ptr[label] and queue.filled[slot] == ref.filled[label]
            # same slot order as the reference, not just the same set
            for i in range(ref.filled[label]):
                torch.testing.assert_close(queue.keys[slot, i], ref.rings[label][i])


def test_negatives_mask():
    queue = PerClassQueue(num_classes=3, size=4, dim=2)
    queue.enqueue(torch.randn(6, 2), torch.tensor([0, 0, 1, 2, -1, -1]))
    keys, labels = queue.get()
    mask = PerClassQueue.negatives_mask(torch.tensor([0, 1, -1]), labels)
    assert keys.shape == (6, 2)
    for n, q in enumerate([0, 1, -1]):
        for f, k in enumerate(labels.tolist()):
            assert mask[n, f] == (q == -1 or k == -1 or k != q)
    assert not mask[0][labels == 0].any() and mask[2].all()


def test_state_dict_round_trip():
    queue = PerClassQueue(num_classes=3, size=4, dim=2)
    queue.enqueue(torch.randn(5, 2), torch.tensor([0, 1, 1, -1, 2]))
    fresh = PerClassQueue(num_classes=3, size=4, dim=2)
    fresh.load_state_dict(queue.state_dict())
    for a, b in zip(queue.get(), fresh.get()):
        torch.testing.assert_close(a, b)
    assert set(queue.state_dict()) == {"keys", "ptr", "filled"}


def test_dense_loss_never_uses_same_class_negatives():
    torch.manual_seed(1)
    loss_fn = PerClassDenseContrast(num_classes=3, dim=4, queue_size=8, temperature=0.5,
                                    samples_per_image=100, enqueue_per_image=100)
    b, h, w = 2, 2, 2
    q, k = torch.randn(b, 4, h, w), torch.randn(b, 4, h, w)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    s = loss_fn.stride  # cell (i, j) at pixel (s·j, s·i) of an (s·h)×(s·w) view
    grid = torch.stack([(2 * s * xs + 1) / (s * w) - 1, (2 * s * ys + 1) / (s * h) - 1],
                       -1).float()
    grid = grid.expand(b, h, w, 2)
    valid = torch.ones(b, h, w, dtype=torch.bool)
    classes = torch.tensor([[[1, 1], [2, -1]], [[1, 2], [2, 0]]])
    loss_fn.train()
    loss_fn(q, k, grid, valid, classes)  # fills the queue with these cells' keys
    loss, _ = loss_fn(q, k, grid, valid, classes, update_queue=False)
    # brute force: each cell against queue entries + other images' cells of another class
    qn = torch.nn.functional.normalize(q, dim=1).flatten(2)
    kn = torch.nn.functional.normalize(k, dim=1).flatten(2)
    queue_keys, queue_labels = loss_fn.queue.get()
    labels = classes.flatten(1)
    total = []
    for i in range(b):
        for c in range(h * w):
            lab = int(labels[i, c])
            negs = [queue_keys[j] for j in range(len(queue_keys))
                    if lab == -1 or queue_labels[j] == -1 or queue_labels[j] != lab]
            negs += [kn[o, :, d] for o in range(b) for d in range(h * w)
                     if o != i and (lab == -1 or labels[o, d] == -1 or labels[o, d] != lab)]
            total.append(info_nce(qn[i, :, c][None], kn[i, :, c][None],
                                  torch.stack(negs), 0.5))
    torch.testing.assert_close(loss, torch.stack(total).mean(), atol=1e-5, rtol=1e-5)


def test_enqueue_writes_the_buffers_in_place():
    """DDP's buffer broadcast and .to() hold on to the buffer tensors: enqueue must not swap
    them for new ones (and snapshots handed to a loss must not change after it)."""
    from densessl.losses import MoCoQueue

    for queue, args in ((PerClassQueue(num_classes=3, size=4, dim=2), (torch.tensor([0, 2]),)),
                        (MoCoQueue(4, 2), ())):
        buffer = queue.keys
        before, _ = queue.snapshot()
        queue.enqueue(torch.ones(2, 2), *args)
        assert queue.keys is buffer and queue.keys.data_ptr() == buffer.data_ptr()
        assert (queue.keys == 1).any() and not (before == 1).any()


@pytest.mark.parametrize("background", ["negative", "own_class", "ignore"])
def test_dense_background_modes_match_brute_force(background):
    """loss.dense.background: the queue's content and the loss against a loop over cells that
    applies each mode's rule by hand (SegLoc's background: unknown, its own class, or out)."""
    torch.manual_seed(2)
    classes_n, t = 3, 0.5
    loss_fn = DenseContrast(dim=4, queue_size=16, temperature=t, samples_per_image=100,
                            enqueue_per_image=100, num_classes=classes_n, background=background)
    b, h, w = 2, 3, 3
    q, k = torch.randn(b, 4, h, w), torch.randn(b, 4, h, w)
    s = loss_fn.stride
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    grid = torch.stack([(2 * s * xs + 1) / (s * w) - 1, (2 * s * ys + 1) / (s * h) - 1],
                       -1).float().expand(b, h, w, 2)
    valid = torch.ones(b, h, w, dtype=torch.bool)
    valid[1, 2, 2] = False
    classes = torch.tensor([[[1, -1, -1], [2, -1, 0], [1, 1, -1]],
                            [[-1, -1, 2], [-1, 0, 0], [2, -1, -1]]])
    loss_fn.train()
    loss_fn(q, k, grid, valid, classes)  # fills the queue with these cells' keys
    loss, _ = loss_fn(q, k, grid, valid, classes, update_queue=False)

    # each mode's rule, by hand: the class a cell counts as, and whether it takes part
    def label_of(c):
        return classes_n if (c < 0 and background == "own_class") else c

    qn = F.normalize(q, dim=1).flatten(2)
    kn = F.normalize(k, dim=1).flatten(2)
    labels = classes.flatten(1)
    cells = [(i, c) for i in range(b) for c in range(h * w)
             if valid.flatten(1)[i, c] and not (background == "ignore" and labels[i, c] < 0)]
    # the queue holds exactly the taking-part cells' keys, each in its class's ring
    queue_keys, queue_labels = loss_fn.queue.get()
    expected = sorted((label_of(int(labels[i, c])), kn[i, :, c].tolist()) for i, c in cells)
    got = sorted((int(lab), key.tolist()) for lab, key in zip(queue_labels, queue_keys))
    assert [e[0] for e in expected] == [g[0] for g in got]
    torch.testing.assert_close(torch.tensor([e[1] for e in expected]),
                               torch.tensor([g[1] for g in got]))
    if background == "ignore":
        assert all(int(lab) >= 0 for lab in queue_labels)

    def may_be_negative(query_label, key_label):
        return query_label == -1 or key_label == -1 or query_label != key_label

    total = []
    for i, c in cells:
        lab = label_of(int(labels[i, c]))
        negs = [queue_keys[j] for j in range(len(queue_keys))
                if may_be_negative(lab, int(queue_labels[j]))]
        negs += [kn[o, :, d] for o, d in cells
                 if o != i and may_be_negative(lab, label_of(int(labels[o, d])))]
        total.append(info_nce(qn[i, :, c][None], kn[i, :, c][None], torch.stack(negs), t))
    torch.testing.assert_close(loss, torch.stack(total).mean(), atol=1e-5, rtol=1e-5)


def test_background_own_class_needs_per_class_queues():
    with pytest.raises(ValueError, match="own_class"):
        DenseContrast(dim=4, background="own_class")
    from densessl.errors import RecipeError
    from densessl.recipe import parse_recipe

    with pytest.raises(RecipeError, match="own_class needs loss.queue: per_class"):
        parse_recipe({"loss": {"dense": {"background": "own_class"}, "queue": "single"}}, "<test>")
