"""X-ray benchmarks: cut-paste pairs/s per worker, and PerClassQueue vs a per-class loop.

    python benchmarks/bench_xray.py [--size 256] [--pairs 50] [--device cpu]

Figures go in notes, not timed tests. The cut-paste figure is one process (= one DataLoader
worker) building pairs from the synthetic X-ray set (generated once into the cache).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from densessl.losses import PerClassQueue
from densessl.pairs import CutPastePairs


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

    def negatives(self, query_labels):
        keys, labels = [], []
        for c in range(len(self.ptr)):
            keys.append(self.keys[c, : self.filled[c]])
            label = -1 if c == len(self.ptr) - 1 else c
            labels.append(torch.full((self.filled[c],), label, device=query_labels.device))
        keys, labels = torch.cat(keys), torch.cat(labels)
        q, k = query_labels[:, None], labels[None]
        return keys, labels, (q != k) | (q < 0) | (k < 0)


def bench_cut_paste(size: int, pairs: int, mode: str) -> float:
    with tempfile.TemporaryDirectory() as cache:
        builder = CutPastePairs(cache_dir=cache, image_size=size, mode=mode)
        builder[0]
        start = time.perf_counter()
        for i in range(pairs):
            builder[i % len(builder)]
        return pairs / (time.perf_counter() - start)


def bench_queue(impl, classes, size, dim, batch, device, steps=20) -> float:
    keys = torch.nn.functional.normalize(torch.randn(batch, dim, device=device), dim=1)
    labels = torch.randint(-1, classes, (batch,), device=device)
    for _ in range(3):  # warm-up, partly filled rings
        impl.enqueue(keys, labels)
        impl.negatives(labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        impl.enqueue(keys, labels)
        impl.negatives(labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    partial = (time.perf_counter() - start) / steps * 1000
    for _ in range(2 * size * (classes + 1) // batch):  # steady state: every ring full
        impl.enqueue(keys, labels)
        impl.negatives(labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        impl.enqueue(keys, labels)
        impl.negatives(labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return partial, (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-pairs", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a DataLoader worker runs single-threaded
    if not args.skip_pairs:
        for mode in ("segloc", "insloc"):
            rate = bench_cut_paste(args.size, args.pairs, mode)
            print(f"cut_paste {mode} {args.size}px: {rate:.1f} pairs/s per worker")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = torch.device(args.device)
    classes, size, dim, batch = 12, 4096, 128, 256
    vectorised = PerClassQueue(classes, size, dim).to(device)
    loop = LoopQueues(classes, size, dim, device)
    t_vec = bench_queue(vectorised, classes, size, dim, batch, device)
    t_loop = bench_queue(loop, classes, size, dim, batch, device)
    print(f"PerClassQueue enqueue+negatives ({classes} classes, K={size}, D={dim}, "
          f"batch {batch}, {device}), ms per step, [filling, full]: vectorised "
          f"[{t_vec[0]:.2f}, {t_vec[1]:.2f}], per-class loop [{t_loop[0]:.2f}, {t_loop[1]:.2f}]")


if __name__ == "__main__":
    main()
