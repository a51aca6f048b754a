"""bf16 autocast (issue #7's GPU path, exercised on the CPU): the encoder runs in bf16, the
contrastive maths stays in float32 (1/T amplifies rounding), and a step trains."""

from __future__ import annotations

import torch
from helpers import identity_grid

from densessl.bench import bench_recipe, make_pair_batch
from densessl.losses import DenseContrast, InstanceContrast


def test_losses_compute_in_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 8, 4, 4, generator=g), torch.randn(3, 8, 4, 4, generator=g)
    classes = torch.randint(-1, 3, (3, 4, 4), generator=g)
    valid = torch.ones(3, 4, 4, dtype=torch.bool)
    results = []
    for autocast in (False, True):
        torch.manual_seed(1)  # same cells drawn
        dense = DenseContrast(8, queue_size=16, samples_per_image=16, num_classes=3)
        instance = InstanceContrast(8, queue_size=4, queue="per_class", num_classes=3)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for _ in range(3):  # the queues fill, then take part
                d, _ = dense(q, k, identity_grid(3, 4, 4, stride=1), valid, class_map=classes)
                i, _ = instance(q[:, :, 0, 0], k[:, :, 0, 0], torch.tensor([0, 1, -1]))
        assert d.dtype == i.dtype == torch.float32
        results.append(torch.stack([d, i]))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)


def test_a_bf16_step_trains():
    torch.manual_seed(0)
    from densessl.methods import DensePretraining

    # num_classes 12: make_pair_batch draws class ids 0..11
    recipe = bench_recipe("resnet18", 64, 4, instance_weight=1.0, queue="per_class",
                          num_classes=12, dense_queue_size=16, instance_queue_size=8)
    batch = make_pair_batch(recipe, torch.device("cpu"), with_instances=True)
    task = DensePretraining(recipe)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(2):
            loss, logs = task.compute_losses(batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in task.model.online.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert task.model.online.backbone.conv1.weight.grad.abs().sum() > 0
