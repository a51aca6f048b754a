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

from densessl.bench.queues import compare_queues
from densessl.pairs import CutPastePairs


def bench_cut_paste(size: int, pairs: int, mode: str) -> float:
    with tempfile.TemporaryDirectory() as cache:
        builder = CutPastePairs(cache_dir=cache, image_size=size, mode=mode)
        builder[0]
        start = time.perf_counter()
        for i in range(pairs):
            builder[i % len(builder)]
        return pairs / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-pairs", action="store_true")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker runs single-threaded
    if not args.skip_pairs:
        for mode in ("segloc", "insloc"):
            rate = bench_cut_paste(args.size, args.pairs, mode)
            print(f"cut_paste {mode} {args.size}px: {rate:.1f} pairs/s per worker")
    torch.set_num_threads(threads)
    times = compare_queues(device=args.device)
    print(f"PerClassQueue enqueue+negatives (12 classes, K=4096, D=128, batch 256, "
          f"{args.device}, {threads} threads), ms per step: {times}")


if __name__ == "__main__":
    main()
