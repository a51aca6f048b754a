"""StreamSampler's window groups: epoch e permutes groups of ``group`` consecutive indices,
each group at consecutive positions; ``group`` 1 is the plain permutation of before."""

from itertools import islice

import numpy as np
import pytest
import torch

from densessl.seeding import ORDER, StreamSampler, derive_seed


def plain_order(n, seed, epoch):
    """The ungrouped epoch order, written out: torch.randperm seeded by (seed, epoch)."""
    g = torch.Generator().manual_seed(derive_seed(seed, epoch, ORDER))
    return torch.randperm(n, generator=g).tolist()


def stream(sampler, count):
    return list(islice(iter(sampler), count))


@pytest.mark.parametrize("n,seed", [(10, 0), (37, 5), (1000, 123)])
def test_group_1_is_the_plain_permutation(n, seed):
    sampler = StreamSampler(n, batch_size=4, seed=seed)
    expected = [i for e in range(3) for i in plain_order(n, seed, e)]
    got = stream(sampler, 3 * n)
    assert [p for p, _ in got] == list(range(3 * n))
    assert [i for _, i in got] == expected
    explicit = StreamSampler(n, batch_size=4, seed=seed, group=1)
    assert [i for _, i in stream(explicit, 3 * n)] == expected


@pytest.mark.parametrize("n,group", [(64, 8), (50, 8), (37, 4), (5, 16)])
def test_groups_are_contiguous_and_each_epoch_is_a_permutation(n, group):
    sampler = StreamSampler(n, batch_size=group, seed=3, group=group)
    epochs = []
    for e in range(4):
        order = [sampler.index_at(p) for p in range(e * n, (e + 1) * n)]
        assert sorted(order) == list(range(n))  # every index once, nothing ≥ n
        runs = [order[0] // group]  # group ids in the order their members appear
        for a, b in zip(order, order[1:]):
            if b // group == a // group:
                assert b == a + 1  # a group's members, in order, next to each other
            else:
                assert b % group == 0  # a new group starts at its first member
                runs.append(b // group)
        assert sorted(runs) == list(range(-(-n // group)))  # each group one run
        # the groups in the order a seeded randperm of the groups gives
        assert runs == plain_order(-(-n // group), 3, e)
        epochs.append(order)
    if n > group:
        assert any(a != b for a, b in zip(epochs, epochs[1:]))  # epochs differ


@pytest.mark.parametrize("group,start", [(1, 0), (1, 77), (8, 77), (8, 128), (4, 301)])
def test_resume_continues_the_uninterrupted_stream(group, start):
    n, batch = 100, 8
    full = stream(StreamSampler(n, batch, seed=9, group=group), start + 250)
    resumed = stream(StreamSampler(n, batch, seed=9, start=start, group=group), 250)
    assert resumed == full[start:]
    # position → index is a pure function: a fresh sampler asked out of order agrees
    fresh = StreamSampler(n, batch, seed=9, group=group)
    for p in np.random.default_rng(0).permutation(start + 250)[:60]:
        assert fresh.index_at(int(p)) == full[p][1]


def test_group_must_be_positive():
    with pytest.raises(ValueError, match="group"):
        StreamSampler(10, 2, seed=0, group=0)


def test_make_dataloader_keeps_a_sources_window_groups_together(tmp_path):
    """make_dataloader reads ``sample_group`` from the source under the builder: each batch
    holds whole groups, whose windows lie in one internal block."""
    import rasterio
    from rasterio.transform import from_origin

    from densessl.data.geotiff_tiles import GeoTiffTiles
    from densessl.pairs.same_image import SameImagePairs
    from densessl.recipe import load_recipe
    from densessl.workflows.pretraining import make_dataloader, sample_group

    raw = np.random.default_rng(0).integers(1, 255, (3, 256, 256)).astype(np.uint8)
    path = tmp_path / "scene.tif"
    with rasterio.open(path, "w", driver="GTiff", width=256, height=256, count=3,
                       dtype="uint8", crs="EPSG:32633", tiled=True, blockxsize=64,
                       blockysize=64, transform=from_origin(0, 0, 10, 10)) as dst:
        dst.write(raw)
    recipe = load_recipe({
        "name": "groups", "seed": 2,
        "data": {"source": "geotiff_tiles", "path": str(path), "channels": 3,
                 "image_size": 32},
        "pairs": {"builder": "same_image"},
        "augment": {"view_size": 32},
        "model": {"backbone": "resnet18"},
        "train": {"batch_size": 8, "max_steps": 2, "num_workers": 0},
    })
    source = GeoTiffTiles(str(path), image_size=32, channels=3, items_per_epoch=64,
                          windows_per_block=4, seed=2)
    builder = SameImagePairs(source)
    assert sample_group(builder) == 4
    loader = make_dataloader(recipe, builder, start=8)
    assert loader.sampler.group == 4 and loader.sampler.start == 8
    batches = list(islice(iter(loader.batch_sampler), 3))
    for batch in batches:
        groups = [i // 4 for _, i in batch]
        assert groups[:4] == [groups[0]] * 4 and groups[4:] == [groups[4]] * 4
        for first in (0, 4):
            blocks = set()
            for _, i in batch[first:first + 4]:
                col, row, w, h = source[i]["meta"]["window"]
                blocks.add((row // 64, col // 64, (row + h - 1) // 64, (col + w - 1) // 64))
            assert len(blocks) == 1  # the group's windows share one block
            r0, c0, r1, c1 = blocks.pop()
            assert (r0, c0) == (r1, c1)  # inside one block
    # a builder of another length than the source maps its indices some other way: no groups
    other = type("Other", (), {"dataset": source, "__len__": lambda self: 10})()
    assert sample_group(other) == 1
