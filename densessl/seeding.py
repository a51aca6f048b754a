"""Random streams that are a function of (seed, position), so a resumed run draws the same
numbers as an uninterrupted one.

Every sample and every training step reseeds torch, numpy and Python's ``random`` from a
seed derived from the run seed and the sample's position in the stream (or the step), instead
of letting generator state run on from process start. A run resumed at step N, with any number
of DataLoader workers, then draws exactly what the uninterrupted run drew at step N.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

# stream tags: the same (seed, position) gives unrelated numbers in each stream
ORDER, SAMPLE, STEP = 0x6F726472, 0x73616D70, 0x73746570


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from non-negative integers (numpy's SeedSequence mixes them)."""
    words = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(
        2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def seed_all(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), numpy's and Python's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_states() -> dict:
    """Every global generator state of this process (stored in checkpoints)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # plain types and tensors only: Lightning loads checkpoints with weights_only=True
    states = {"torch": torch.get_rng_state(),
              "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                        float(gauss)],
              "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos,
                         has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class StreamSampler(Sampler):
    """An endless stream of ``(position, index)``: position p is the p-th sample of the run
    over all processes; epoch e = p // n is a permutation of the n indices seeded by (seed, e).

    ``start`` is the first global position (the samples seen before a resume). With several
    processes each global batch of ``batch_size × world`` positions is split in rank order, so
    a 2-process run sees what a 1-process run with twice the batch sees. The rank and world
    size are read when iteration starts (after the process group exists).

    ``group`` > 1 keeps runs of ``group`` consecutive indices together (a source whose items
    come in groups that share reads, e.g. ``geotiff_tiles``' ``windows_per_block``): epoch e
    permutes the ceil(n / group) groups — the same seeded ``randperm``, over groups — and
    lists each group's indices in order, dropping the indices ≥ n of a last partial group, so
    an epoch is still n positions and each group sits at consecutive positions (in one batch
    when ``batch_size`` is a multiple of ``group`` and n is too). ``group`` 1 is the plain
    permutation of the n indices.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0,
                 group: int = 1) -> None:
        if group < 1:
            raise ValueError(f"StreamSampler: group must be >= 1, got {group}")
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.group = int(group)
        self._epoch, self._order = -1, None

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The n indices of epoch ``epoch`` in stream order: a function of (seed, epoch)."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, ORDER))
        if self.group == 1:
            return torch.randperm(self.n, generator=generator)
        groups = torch.randperm(-(-self.n // self.group), generator=generator)
        order = (groups[:, None] * self.group + torch.arange(self.group)).reshape(-1)
        return order[order < self.n]

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self.epoch_order(epoch)
        return int(self._order[offset])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rank, world = _rank_and_world()
        position = self.start
        while True:
            for i in range(self.batch_size):
                p = position + rank * self.batch_size + i
                yield p, self.index_at(p)
            position += self.batch_size * world


class SeededSamples(Dataset):
    """``dataset[(position, index)]``: ``dataset[index]`` with every global generator seeded
    by (seed, position) first, so a sample depends on its place in the stream only — not on
    the worker that builds it or on when that worker started."""

    def __init__(self, dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        position, index = item
        seed_all(derive_seed(self.seed, position, SAMPLE))
        return self.dataset[index]


def seed_step(seed: int, step: int, rank: int = 0) -> None:
    """Seed the main process's generators for training step ``step`` (view augmentation, cell
    sampling, box jitter, key shuffles)."""
    seed_all(derive_seed(seed, step, rank, STEP))
