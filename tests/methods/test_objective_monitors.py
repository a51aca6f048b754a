"""Issue #26: the collapse monitors read what the configured objective reads, and the run's
mean of dense query cells per image reaches metrics.json (resumes included).

Batches are built here by hand (no bench code); the encoder is a stub whose output the test
chooses, and every step goes through ``DensePretraining.compute_losses``, the training path.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import identity_pair_batch, make_sync_free
from lightly.utils.debug import std_of_l2_normalized
from torch._subclasses.fake_tensor import FakeTensorMode

from densessl.methods import DensePretraining
from densessl.methods.monitors import collapse_stats, dense_cells
from densessl.models.health import collapse_message, sparse_dense_message
from densessl.recipe import load_recipe

B, H, STRIDE, DIM = 4, 8, 8, 128          # 4 images, 8×8 cells of a 64 px view


def tiny_recipe(**loss):
    """``loss``: loss settings by section (``dense={...}``, ...), merged over the ones here."""
    sections = {"global_": {"weight": 0.0}, "dense": {"queue_size": 32}}
    for key, value in loss.items():
        sections[key] = {**sections.get(key, {}), **value} if isinstance(value, dict) else value
    return load_recipe({
        "name": "monitors",
        "data": {"image_size": 80, "options": {"num_images": B}},
        "augment": {"view_size": H * STRIDE},
        "model": {"backbone": "resnet18", "global_head": False, "key_bn": "batch"},
        "loss": sections,
        "train": {"batch_size": B},
    })


def stub_encoder(task: DensePretraining, dense_a: torch.Tensor) -> None:
    """The online branch returns ``dense_a`` (B×D×H×H), the momentum branch noise."""
    def encode(x, branch="online"):
        if branch == "online":
            return {"dense": dense_a.clone().requires_grad_(True)}
        return {"dense": torch.randn(B, DIM, H, H)}
    task.model.encode = encode


def train_steps(task: DensePretraining, batches) -> dict[str, torch.Tensor]:
    """``compute_losses`` in training mode, keeping the logs as ``training_step`` does."""
    task.train()
    for batch in batches:
        _, logs = task.compute_losses(batch)
        task.last_stats = {k: v.float() for k, v in logs.items()}
    return task.last_stats


def segments_on_a_bag() -> torch.Tensor:
    """A thin pasted segment (class 1, 1×3 cells on an odd row: one that every 2nd cell of the
    map misses) per image, at different places, on the bag (−1)."""
    class_map = torch.full((B, H, H), -1, dtype=torch.long)
    for i in range(B):
        class_map[i, 2 * i + 1, 1 + i % 2:4 + i % 2] = 1
    return class_map


# ---------------------------------------------------------------- collapse_stats with a mask

def brute_force_collapse(features, groups, mask):
    """Python loops over the selected rows, in float64."""
    rows = [([v / math.sqrt(sum(x * x for x in row)) for v in row], g)
            for row, g, m in zip(features.double().tolist(), groups.tolist(), mask.tolist()) if m]
    d = features.shape[1]
    stds = []
    for j in range(d):
        col = [r[j] for r, _ in rows]
        mean = sum(col) / len(col)
        stds.append(math.sqrt(sum((v - mean) ** 2 for v in col) / (len(col) - 1)))
    cos = [sum(a * b for a, b in zip(ra, rb)) for ia, (ra, ga) in enumerate(rows)
           for ib, (rb, gb) in enumerate(rows) if ia != ib and ga != gb]
    return sum(stds) / d * math.sqrt(d), sum(cos) / len(cos)


def test_masked_collapse_stats_match_a_brute_force_loop():
    gen = torch.Generator().manual_seed(3)
    features = torch.randn(40, 6, generator=gen) * 2 + 0.5
    groups = torch.randint(0, 7, (40,), generator=gen)
    mask = torch.rand(40, generator=gen) < 0.4
    features[~mask] = 100.0   # unselected rows far off: any leak would show
    std, cos = brute_force_collapse(features, groups, mask)
    stats = collapse_stats(features, groups, mask, num_groups=7)
    assert float(stats["feature_std"]) == pytest.approx(std, rel=1e-5)
    assert float(stats["mean_cosine"]) == pytest.approx(cos, rel=1e-4, abs=1e-5)


def test_per_class_leaves_same_class_pairs_out_like_the_objective():
    """With per-class queues two cells of one class are never negatives: a float64 loop over
    pairs of different images and different (known) classes is the reference."""
    gen = torch.Generator().manual_seed(8)
    features = torch.randn(48, 5, generator=gen)
    groups = torch.randint(0, 6, (48,), generator=gen)
    classes = torch.randint(-1, 4, (48,), generator=gen)  # −1: unknown, pairs with everyone
    mask = torch.rand(48, generator=gen) < 0.7
    features[:, 0] += 3.0 * classes.clamp_min(0)  # one class alike: its pairs raise the mean
    z = torch.nn.functional.normalize(features.double(), dim=1).tolist()
    rows = [(z[i], int(groups[i]), int(classes[i])) for i in range(48) if mask[i]]
    cos = [sum(a * b for a, b in zip(ra, rb)) for ia, (ra, ga, ca) in enumerate(rows)
           for ib, (rb, gb, cb) in enumerate(rows)
           if ia != ib and ga != gb and not (ca >= 0 and ca == cb)]
    stats = collapse_stats(features, groups, mask, num_groups=6, classes=classes, num_classes=4)
    assert float(stats["mean_cosine"]) == pytest.approx(sum(cos) / len(cos), rel=1e-4)
    without = collapse_stats(features, groups, mask, num_groups=6)
    assert float(without["mean_cosine"]) != pytest.approx(sum(cos) / len(cos), rel=1e-2)


def test_unmasked_feature_std_is_lightlys_scaled_by_sqrt_d():
    features = torch.randn(50, 16, generator=torch.Generator().manual_seed(4))
    z = torch.nn.functional.normalize(features, dim=1)
    expected = float(std_of_l2_normalized(z)) * 16**0.5
    assert float(collapse_stats(features)["feature_std"]) == pytest.approx(expected, rel=1e-5)


def test_nothing_selected_gives_nan_not_a_healthy_value():
    features = torch.randn(6, 4)
    one_image = collapse_stats(features, torch.zeros(6, dtype=torch.long), num_groups=1)
    assert math.isnan(float(one_image["mean_cosine"]))
    none = collapse_stats(features, torch.arange(6), torch.zeros(6, dtype=torch.bool))
    assert math.isnan(float(none["feature_std"])) and math.isnan(float(none["mean_cosine"]))


# ------------------------------------------------- behaviour through the training step (#26)

def test_background_ignore_on_a_uniform_bag_does_not_warn():
    """Healthy: segment cells diverse, the bag (neither query nor key) one texture."""
    torch.manual_seed(0)
    class_map = segments_on_a_bag()
    dense = torch.randn(DIM)[None, :, None, None].repeat(B, 1, H, H)     # the uniform bag
    segment = class_map[:, None].expand(B, DIM, H, H) >= 0
    dense[segment] = torch.randn(int(segment.sum()))
    task = DensePretraining(tiny_recipe(
        dense={"background": "ignore", "samples_per_image": 16}))
    stub_encoder(task, dense)
    final = train_steps(task, [identity_pair_batch(class_map)] * 3)
    # what the monitors read before: every 2nd cell of the map, mostly bag → a false alarm
    before = collapse_stats(*dense_cells(dense))
    assert collapse_message({"final": {k: float(v) for k, v in before.items()}}) is not None
    assert collapse_message({"final": task.final_stats()}) is None
    assert float(final["mean_cosine"]) < 0.3 and float(final["feature_std"]) > 0.5


def test_queries_collapsed_on_a_diverse_bag_warn():
    """Collapsed where the objective reads: every segment cell one vector, the bag diverse."""
    torch.manual_seed(1)
    class_map = segments_on_a_bag()
    dense = torch.randn(B, DIM, H, H)
    segment = class_map[:, None].expand(B, DIM, H, H) >= 0
    dense[segment] = (torch.randn(DIM)[None, :, None, None].expand(B, DIM, H, H)
                      + 1e-4 * torch.randn(B, DIM, H, H))[segment]
    task = DensePretraining(tiny_recipe(
        dense={"background": "ignore", "samples_per_image": 16}))
    stub_encoder(task, dense)
    train_steps(task, [identity_pair_batch(class_map)] * 2)
    before = collapse_stats(*dense_cells(dense))
    assert collapse_message({"final": {k: float(v) for k, v in before.items()}}) is None
    message = collapse_message({"final": task.final_stats()})
    assert message is not None and "mean_cosine" in message and "feature_std" in message


def test_steps_without_queries_keep_the_last_known_values_and_never_known_is_unknown():
    torch.manual_seed(2)
    bag_only = identity_pair_batch(torch.full((B, H, H), -1, dtype=torch.long))
    task = DensePretraining(tiny_recipe(
        dense={"background": "ignore", "samples_per_image": 16}))
    stub_encoder(task, torch.randn(B, DIM, H, H))
    train_steps(task, [bag_only] * 2)
    final = task.final_stats()
    assert "mean_cosine" not in final and "feature_std" not in final
    assert collapse_message({"final": final}) is None        # unknown, not collapse
    known = train_steps(task, [identity_pair_batch(segments_on_a_bag())])
    after = train_steps(task, [bag_only])
    for key in ("feature_std", "mean_cosine"):
        assert math.isfinite(float(known[key])) and float(after[key]) == float(known[key])
        assert task.final_stats()[key] == float(known[key])
    # NaN features where queries exist still read as collapse (divergence is not hidden)
    stub_encoder(task, torch.full((B, DIM, H, H), float("nan")))
    train_steps(task, [identity_pair_batch(segments_on_a_bag())])
    assert collapse_message({"final": task.final_stats()}) is not None


# ------------------------------------------------------- dense query cells per image (part 1a)

def random_batches(steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for step in range(steps):
        class_map = torch.randint(-1, 3, (B, H, H), generator=gen)
        class_map[0] = -1                                   # an image with no segment at all
        # fewer valid cells from step to step: the last step alone is not the mean
        valid = torch.rand(B, H, H, generator=gen) < 0.9 - 0.18 * step
        batches.append(identity_pair_batch(class_map, valid))
    return batches


def independent_mean(batches, per_image: int, ignore: bool) -> float:
    cells = images = 0
    for batch in batches:
        for i in range(B):
            count = 0
            for y in range(H):
                for x in range(H):
                    if batch.valid_ab[i, y, x] and (not ignore or batch.class_map_a[i, y, x] >= 0):
                        count += 1
            cells += min(count, per_image)
            images += 1
    return cells / images


@pytest.mark.parametrize("background", ["ignore", "negative"])
def test_dense_query_cells_per_image_is_the_run_mean(background):
    per_image = 20       # some images have more valid cells than this, some fewer
    batches = random_batches(5, seed=5)
    task = DensePretraining(tiny_recipe(
        dense={"background": background, "samples_per_image": per_image}))
    stub_encoder(task, torch.randn(B, DIM, H, H))
    logs = train_steps(task, batches)
    expected = independent_mean(batches, per_image, background == "ignore")
    # the batches differ: the last step alone is not the mean
    assert independent_mean(batches[-1:], per_image, background == "ignore") != expected
    assert task.run_stats()["dense_query_cells_per_image"] == pytest.approx(expected, rel=1e-6)
    assert float(logs["dense_query_cells_per_image"]) == pytest.approx(expected, rel=1e-6)
    message = sparse_dense_message({**task.run_stats(), "final": task.final_stats()})
    assert message is None  # well above MIN_DENSE_CELLS_PER_IMAGE


def test_the_run_mean_survives_a_resume_through_the_checkpoint():
    batches = random_batches(6, seed=6)
    recipe = tiny_recipe(dense={"background": "ignore", "samples_per_image": 20})
    first = DensePretraining(recipe)
    stub_encoder(first, torch.randn(B, DIM, H, H))
    train_steps(first, batches[:3])
    checkpoint: dict = {}
    first.on_save_checkpoint(checkpoint)
    resumed = DensePretraining(recipe)
    resumed.on_load_checkpoint(checkpoint)
    stub_encoder(resumed, torch.randn(B, DIM, H, H))
    train_steps(resumed, batches[3:])
    whole = independent_mean(batches, 20, ignore=True)
    assert resumed.run_stats()["dense_query_cells_per_image"] == pytest.approx(whole, rel=1e-6)
    # an older checkpoint (no totals): the steps since the resume only
    older = DensePretraining(recipe)
    older.on_load_checkpoint({k: v for k, v in checkpoint.items() if k != "run_monitors"})
    stub_encoder(older, torch.randn(B, DIM, H, H))
    train_steps(older, batches[3:])
    since = independent_mean(batches[3:], 20, ignore=True)
    assert older.run_stats()["dense_query_cells_per_image"] == pytest.approx(since, rel=1e-6)
    # the state dict's keys do not change (a checkpoint of an older run still loads)
    assert not any("dense_cell_counts" in k or "collapse_monitor" in k
                   for k in resumed.state_dict())


def test_sparse_dense_message_prefers_the_run_mean():
    last_step_sparse = {"final": {"dense_pairs": 8.0}, "pairs": 2400, "steps": 150}
    assert "in the last step" in sparse_dense_message(last_step_sparse)
    assert sparse_dense_message({**last_step_sparse, "dense_query_cells_per_image": 3.0}) is None
    message = sparse_dense_message({"final": {"dense_pairs": 64.0}, "pairs": 2400,
                                    "steps": 150, "dense_query_cells_per_image": 0.4})
    assert "0.40 query cells per image on average over the run" in message


# ------------------------------------------------------------- real encoder, no host reads

@pytest.mark.parametrize("loss", [
    {"dense": {"background": "ignore", "samples_per_image": 16}},
    {"dense": {"weight": 0.0}, "instance": {"weight": 1.0, "queue_size": 16}},
], ids=["dense_ignore", "instance_only"])
def test_monitors_of_the_objective_read_nothing_on_the_host(loss):
    torch.manual_seed(7)
    task = DensePretraining(tiny_recipe(**loss))
    make_sync_free(task)
    batch = identity_pair_batch(segments_on_a_bag(), boxes_per_image=2)
    train_steps(task, [batch])   # a real step first: queues hold keys
    if task.dense_loss is None:  # instance only: the monitors read the RoI queries
        queries = task.instance_queries(batch, task.model.encode(batch.view_a, "online"))
        features = task.monitor_features(batch, {}, queries)["features"]
        assert features.shape == (B * 2, DIM)
    with FakeTensorMode(allow_non_fake_inputs=True):
        task.model.update(0.99)
        total, _ = task.compute_losses(batch)
        total.backward()
