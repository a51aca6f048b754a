"""bf16 autocast (issue #7's GPU path, exercised on the CPU): the encoder runs in bf16, the
contrastive maths stays in float32 (1/T amplifies rounding), and a step trains."""

from __future__ import annotations

import torch
from helpers import identity_grid, pair_batch

from densessl.bench.training import bench_recipe
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


def _losses_and_grads(task, batch, autocast=False, channels_last=False):
    """One step's loss, its parts and the stem's gradient, with the same draws (cells, key
    shuffles) whatever the precision or memory format."""
    import copy

    task = copy.deepcopy(task)
    if channels_last:
        task = task.to(memory_format=torch.channels_last)
        batch = copy.copy(batch)
        batch.view_a = batch.view_a.contiguous(memory_format=torch.channels_last)
        batch.view_b = batch.view_b.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, logs = task.compute_losses(batch)
    loss.backward()
    grad = task.model.online.backbone.conv1.weight.grad
    return loss, logs, grad


def _task_and_batch():
    from densessl.methods import DensePretraining

    torch.manual_seed(0)
    recipe = bench_recipe("resnet18", 64, 4, instance={"weight": 1.0, "queue_size": 8},
                          dense={"queue_size": 16}, queue="per_class",
                          num_classes=12)  # pair_batch's random classes: 0..11
    batch = pair_batch(recipe, torch.device("cpu"), with_instances=True)
    return DensePretraining(recipe), batch


def test_a_bf16_step_matches_float32():
    """bf16 autocast gives the float32 step's loss (and its parts) to bf16 accuracy, and a
    gradient pointing the same way."""
    task, batch = _task_and_batch()
    ref_loss, ref_logs, ref_grad = _losses_and_grads(task, batch)
    loss, logs, grad = _losses_and_grads(task, batch, autocast=True)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    for key in ("loss_dense", "loss_instance"):
        torch.testing.assert_close(logs[key].float(), ref_logs[key].float(), rtol=2e-2,
                                   atol=2e-2)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    cosine = torch.nn.functional.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0)
    assert cosine > 0.9


def test_channels_last_step_matches_contiguous():
    """channels_last changes the memory layout, not the maths: float32 loss and gradient equal
    the contiguous step's to float32 rounding."""
    task, batch = _task_and_batch()
    ref_loss, ref_logs, ref_grad = _losses_and_grads(task, batch)
    loss, logs, grad = _losses_and_grads(task, batch, channels_last=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-3, atol=1e-5)
