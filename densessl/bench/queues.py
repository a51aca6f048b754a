"""PerClassQueue against the naive per-class Python loop (for ``densessl bench``): enqueue a
batch, then its queries' negative log-sum-exp, with rings filling and full."""

from __future__ import annotations

import time

import torch

from densessl.losses import PerClassQueue
from densessl.losses.functional import pairwise_negatives, ring_negatives


class LoopQueues:
    """The naive alternative: one ring per class, enqueued with a Python loop over classes."""

    def __init__(self, num_classes, size, dim, device):
        self.size = size
        self.keys = torch.zeros(num_classes + 1, size, dim, device=device)
        self.ptr = [0] * (num_classes + 1)
        self.filled = [0] * (num_classes + 1)

    def enqueue(self, keys, labels):
        labels = torch.where(labels < 0, len(self.ptr) - 1, labels)
        for c in range(len(self.ptr)):
            rows = keys[labels == c][-self.size:]
            m = rows.shape[0]
            slots = (self.ptr[c] + torch.arange(m, device=keys.device)) % self.size
            self.keys[c, slots] = rows
            self.ptr[c] = (self.ptr[c] + m) % self.size
            self.filled[c] = min(self.filled[c] + m, self.size)

    def negatives(self, query, query_labels):
        keys, labels = [], []
        for c in range(len(self.ptr)):
            keys.append(self.keys[c, : self.filled[c]])
            label = -1 if c == len(self.ptr) - 1 else c
            labels.append(torch.full((self.filled[c],), label, device=query_labels.device))
        keys, labels = torch.cat(keys), torch.cat(labels)
        allowed = PerClassQueue.negatives_mask(query_labels, labels)
        return pairwise_negatives(query, keys, allowed, 0.2, query.new_ones(query.shape[0]))


def per_class_negatives(queue: PerClassQueue, query, query_labels):
    """What the losses do: one fused product over every ring, masked per ring."""
    keys, valid = queue.snapshot()
    rings = PerClassQueue.negatives_mask(query_labels, queue.ring_labels)
    return ring_negatives(query, keys, valid, rings, 0.2, query.new_ones(query.shape[0]))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timers read the host clock); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_queue(impl, negatives, classes, size, dim, batch, device,
                steps=20) -> tuple[float, float]:
    """Milliseconds per enqueue + ``negatives(impl, query, labels)``: (rings filling, every
    ring full)."""
    keys = torch.nn.functional.normalize(torch.randn(batch, dim, device=device), dim=1)
    labels = torch.randint(-1, classes, (batch,), device=device)

    def run(n: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(n):
            impl.enqueue(keys, labels)
            negatives(impl, keys, labels)
        synchronize(device)
        return (time.perf_counter() - start) / max(n, 1) * 1000

    run(3)  # warm-up, partly filled rings
    filling = run(steps)
    for _ in range(2 * size * (classes + 1) // batch):  # steady state: every ring full
        impl.enqueue(keys, labels)
    return filling, run(steps)


def compare_queues(classes: int = 12, size: int = 4096, dim: int = 128, batch: int = 256,
                   device: torch.device | str = "cpu") -> dict:
    """Milliseconds per enqueue + negatives for PerClassQueue and the loop, filling and full."""
    device = torch.device(device)
    out = {}
    for name, impl, negatives in (
            ("per_class_queue", PerClassQueue(classes, size, dim).to(device), per_class_negatives),
            ("python_loop", LoopQueues(classes, size, dim, device), LoopQueues.negatives)):
        filling, full = bench_queue(impl, negatives, classes, size, dim, batch, device)
        out[name] = {"filling_ms": round(filling, 2), "full_ms": round(full, 2)}
    return out
