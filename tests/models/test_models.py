"""Encoders: feature strides, torchvision weight layout, dense output sizes, momentum twin."""

from __future__ import annotations

import pytest
import torch
import torchvision

from densessl.models import (
    DenseEncoder,
    DenseProjectionHead,
    FPNNeck,
    GlobalProjectionHead,
    MomentumPair,
    ResNetBackbone,
    cosine_momentum,
)


@pytest.mark.parametrize("in_channels", [3, 13])
def test_backbone_strides_and_channels(in_channels):
    net = ResNetBackbone("resnet18", in_channels=in_channels)
    feats = net(torch.randn(2, in_channels, 64, 96))
    assert list(feats) == ["c2", "c3", "c4", "c5"]
    for key, stride in {"c2": 4, "c3": 8, "c4": 16, "c5": 32}.items():
        assert feats[key].shape == (2, net.channels[key], 64 // stride, 96 // stride)
    assert net.channels == {"c2": 64, "c3": 128, "c4": 256, "c5": 512}
    assert net.conv1.in_channels == in_channels


def test_resnet50_channels():
    net = ResNetBackbone("resnet50")
    assert net.channels == {"c2": 256, "c3": 512, "c4": 1024, "c5": 2048}
    feats = net(torch.randn(2, 3, 32, 32))
    assert feats["c5"].shape == (2, 2048, 1, 1)


def test_backbone_rejects_unknown_name():
    with pytest.raises(ValueError, match="resnet18"):
        ResNetBackbone("resnet19")


def test_backbone_state_dict_loads_into_torchvision():
    sd = ResNetBackbone("resnet18").state_dict()
    target = torchvision.models.resnet18(weights=None)
    result = target.load_state_dict(sd, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    assert torch.equal(target.layer1[0].conv1.weight, sd["layer1.0.conv1.weight"])


def test_heads_shapes():
    dense = DenseProjectionHead(32, 16, 8)
    assert dense(torch.randn(2, 32, 5, 7)).shape == (2, 8, 5, 7)
    glob = GlobalProjectionHead(32, 16, 8)
    assert glob(torch.randn(2, 32, 5, 7)).shape == (2, 8)
    neck = FPNNeck({"c2": 8, "c3": 16}, out_channels=4)
    out = neck({"c2": torch.randn(1, 8, 8, 8), "c3": torch.randn(1, 16, 4, 4)})
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "p2": (1, 4, 8, 8),
        "p3": (1, 4, 4, 4),
    }


@pytest.mark.parametrize("neck", ["fpn", "none"])
@pytest.mark.parametrize("stride", [8, 16, 32])
def test_dense_encoder_output_sizes(neck, stride):
    enc = DenseEncoder(
        neck=neck,
        dense_stride=stride,
        neck_dim=32,
        dense_dim=24,
        dense_hidden=32,
        global_dim=16,
        global_hidden=32,
    )
    out = enc(torch.randn(2, 3, 64, 128))
    assert enc.stride == stride
    assert out["dense"].shape == (2, 24, 64 // stride, 128 // stride)
    assert out["global"].shape == (2, 16)
    level_channels = (
        32 if neck == "fpn" else enc.backbone.channels[f"c{[8, 16, 32].index(stride) + 3}"]
    )
    assert out["features"].shape == (2, level_channels, 64 // stride, 128 // stride)


def test_dense_encoder_without_global_head_and_bad_args():
    enc = DenseEncoder(in_channels=4, global_head=False, neck_dim=16, dense_hidden=16)
    assert "global" not in enc(torch.randn(2, 4, 32, 32))
    with pytest.raises(ValueError):
        DenseEncoder(dense_stride=4)
    with pytest.raises(ValueError):
        DenseEncoder(neck="bifpn")


def _tiny_pair():
    torch.manual_seed(0)
    enc = DenseEncoder(neck_dim=16, dense_dim=8, dense_hidden=16, global_dim=8, global_hidden=16)
    return MomentumPair(enc), torch.randn(2, 3, 32, 32)


def test_momentum_branch_uses_momentum_weights():
    pair, x = _tiny_pair()
    online_before = pair.encode(x, "online")["dense"].detach()
    momentum_before = pair.encode(x, "momentum")["dense"]
    # a fresh twin is an exact copy
    torch.testing.assert_close(momentum_before, online_before)

    with torch.no_grad():
        for p in pair.momentum.parameters():
            p.add_(0.1 * torch.randn_like(p))
    online_after = pair.encode(x, "online")["dense"]
    momentum_after = pair.encode(x, "momentum")

    torch.testing.assert_close(online_after.detach(), online_before)
    assert not torch.allclose(momentum_after["dense"], momentum_before)
    assert not torch.allclose(momentum_after["dense"], online_after.detach())
    assert online_after.requires_grad
    assert not momentum_after["dense"].requires_grad
    assert not momentum_after["global"].requires_grad
    assert not any(v.requires_grad for v in momentum_after["pyramid"].values())


def test_momentum_params_frozen_and_checkpointed():
    pair, _ = _tiny_pair()
    assert all(p.requires_grad for p in pair.online.parameters())
    assert not any(p.requires_grad for p in pair.momentum.parameters())
    keys = pair.state_dict().keys()
    assert "online.backbone.conv1.weight" in keys and "momentum.backbone.conv1.weight" in keys
    with pytest.raises(ValueError):
        pair.encode(torch.randn(1, 3, 32, 32), "target")


def test_momentum_update_extremes_and_midpoint():
    pair, _ = _tiny_pair()
    with torch.no_grad():
        for p in pair.momentum.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in pair.momentum.parameters()]

    pair.update(1.0)
    for p, b in zip(pair.momentum.parameters(), before):
        assert torch.equal(p, b)

    pair.update(0.5)
    for p, b, o in zip(pair.momentum.parameters(), before, pair.online.parameters()):
        torch.testing.assert_close(p, 0.5 * b + 0.5 * o)

    pair.update(0.0)
    for p, o in zip(pair.momentum.parameters(), pair.online.parameters()):
        assert torch.equal(p, o)


def test_cosine_momentum_schedule():
    assert cosine_momentum(0, 100) == pytest.approx(0.99)
    assert cosine_momentum(99, 100) == pytest.approx(1.0)
    values = [cosine_momentum(s, 100, start=0.9, end=1.0) for s in range(100)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert cosine_momentum(49.5, 100, 0.9, 1.0) == pytest.approx(0.95)


def test_dense_only_pyramid_computes_the_same_dense_level_and_nothing_finer():
    """pyramid="dense" stops the FPN's top-down pass at the dense level: same values, p2 and
    its lateral/output convolutions never run (they would get no gradient anyway)."""
    torch.manual_seed(0)
    full = DenseEncoder(neck_dim=16, dense_dim=8, dense_hidden=16, global_dim=8,
                        global_hidden=16).eval()
    lean = DenseEncoder(neck_dim=16, dense_dim=8, dense_hidden=16, global_dim=8,
                        global_hidden=16, pyramid="dense").eval()
    lean.load_state_dict(full.state_dict())
    x = torch.randn(2, 3, 64, 64)
    a, b = full(x), lean(x)
    assert set(b["pyramid"]) == {"p3"} and set(a["pyramid"]) == {"p2", "p3", "p4", "p5"}
    torch.testing.assert_close(b["dense"], a["dense"])
    torch.testing.assert_close(b["pyramid"]["p3"], a["pyramid"]["p3"])
    b["dense"].sum().backward()
    p2_out = lean.neck.fpn.layer_blocks[0][0].weight
    assert p2_out.grad is None and lean.neck.fpn.layer_blocks[1][0].weight.grad is not None
    with pytest.raises(ValueError, match="pyramid"):
        DenseEncoder(pyramid="some")


def test_pyramid_levels_follow_the_objectives():
    """build_encoder computes the dense level, plus RoIAlign's p{roi_min_level}..p5 when the
    instance objective is on; a pretraining step then runs with p2 skipped."""
    from helpers import pair_batch

    from densessl.bench.training import bench_recipe
    from densessl.build import build_encoder
    from densessl.methods import DensePretraining

    x = torch.randn(2, 3, 64, 64)
    dense_only = bench_recipe("resnet18", 64, 2)
    assert set(build_encoder(dense_only)(x)["pyramid"]) == {"p3"}
    with_p2 = bench_recipe("resnet18", 64, 2, instance={"weight": 1.0})
    assert set(build_encoder(with_p2)(x)["pyramid"]) == {"p2", "p3", "p4", "p5"}
    without_p2 = bench_recipe("resnet18", 64, 2, instance={"weight": 1.0, "roi_min_level": 3})
    assert set(build_encoder(without_p2)(x)["pyramid"]) == {"p3", "p4", "p5"}
    batch = pair_batch(without_p2, torch.device("cpu"), with_instances=True)
    loss, logs = DensePretraining(without_p2).compute_losses(batch)
    loss.backward()
    assert torch.isfinite(loss) and logs["instance_boxes"] > 0
