"""The training step reads no tensor value on the host, so on a GPU it never waits for the
device (issue #7). Checked without a GPU: under PyTorch's FakeTensorMode tensors carry shapes
but no data, and any op whose result depends on data on the host (``.item()``, ``bool(t)``,
``int(t)``, boolean-mask indexing, ``nonzero``) raises instead of running."""

from __future__ import annotations

import pytest
import torch
from helpers import fake_step, make_sync_free, pair_batch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
)

from densessl.bench.training import bench_recipe
from densessl.methods import DensePretraining

INSTANCE = {"instance": {"weight": 1.0, "queue_size": 8}, "dense": {"queue_size": 16}}
PER_CLASS = {"queue": "per_class", "num_classes": 12}
CONFIGS = {
    "dense_global": {},
    "dense_instance_per_class": {**INSTANCE, **PER_CLASS},
    "dense_instance_single": INSTANCE,
    # InsLoc's pretext: every level, query boxes jittered on the device, 4conv-1fc BN head
    "instance_insloc": {"instance": {"weight": 1.0, "queue_size": 8, "roi_levels": "all",
                                     "box_jitter": True, "roi_head": "conv",
                                     "roi_head_fc_dim": 32},
                        "dense": {"queue_size": 16}},
    "instance_by_size_jitter": {"instance": {"weight": 1.0, "queue_size": 8, "box_jitter": True,
                                             "box_jitter_levels": "all"},
                                "dense": {"queue_size": 16}, **PER_CLASS},
    # robust positives (issue #18): the truncation rank and the noisy-pair monitor too
    "robust_truncate": {**INSTANCE, "robust": {"kind": "truncate", "truncate_warmup_steps": 4}},
    "robust_rince_per_class": {**INSTANCE, "robust": {"kind": "rince"}, **PER_CLASS},
    # an objective added through the registry (issue #28): DetCon's mask-pooled contrast
    "dense_detcon": {"dense": {"queue_size": 16},
                     "detcon": {"weight": 1.0, "max_classes": 12, "background": "segment"}},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_training_step_has_no_host_sync(name):
    torch.manual_seed(0)
    recipe = bench_recipe("resnet18", 64, 4, **CONFIGS[name])
    batch = pair_batch(recipe, torch.device("cpu"), with_instances=True)
    task = DensePretraining(recipe)
    make_sync_free(task)  # what a GPU run picks by itself
    task.compute_losses(batch)  # a real step first: queues hold keys, as in training
    fake_step(task, batch)


def test_the_check_catches_a_host_read():
    """The detector itself: the pre-#7 cell selection (boolean mask) and a per-level nonzero
    must be caught."""
    recipe = bench_recipe("resnet18", 64, 4, instance={"weight": 1.0, "queue_size": 8},
                          dense={"queue_size": 16})
    batch = pair_batch(recipe, torch.device("cpu"), with_instances=True)
    task = DensePretraining(recipe)  # sync_free left at auto: a CPU run uses nonzero
    with pytest.raises((DataDependentOutputException, DynamicOutputShapeException)):
        fake_step(task, batch)
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(
            (DataDependentOutputException, DynamicOutputShapeException)):
        valid = torch.rand(4, 10) > 0.5
        torch.arange(10).expand(4, 10)[valid]


def test_device_cut_paste_has_no_host_sync():
    """The device-side compositing (issue #15) reads no value on the host either: pasting,
    blending, occlusion-aware correspondence, class map and boxes keep fixed shapes."""
    from densessl.pairs import CutPastePairs, collate_pairs
    from densessl.pairs.device_paste import composite_pastes

    torch.manual_seed(0)
    mask = torch.ones(10, 14, dtype=torch.bool)
    segments = [{"image": torch.full((3, 10, 14), 40 * (i + 1), dtype=torch.uint8),
                 "mask": mask, "label": i + 1, "source_size": 32} for i in range(3)]
    builder = CutPastePairs(k=2, image_size=32, segments=segments, device_composite=True,
                            backgrounds=[{"image": torch.rand(3, 32, 32)} for _ in range(2)])
    batch = collate_pairs([builder[i] for i in range(4)])
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = composite_pastes(batch)
    assert out.paste is None and out.box_valid.shape == (8,)
    # the detector: the host builder's box of the visible pixels (a nonzero) is caught
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(
            (DataDependentOutputException, DynamicOutputShapeException)):
        torch.nonzero(out.class_map_a[0] == 1)
