"""Export round trips: torchvision / smp / timm load with no missing or unexpected keys and give
our features; detectron2 key names and shapes follow its documented ResNet layout."""

from __future__ import annotations

import json
import pickle

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn as nn
import torchvision

from densessl.cli import main
from densessl.errors import DensesslError
from densessl.io import save_torch, write_json
from densessl.models import DenseEncoder
from densessl.workflows.export import export_weights


@pytest.fixture
def weights(tmp_path):
    """encoder.pt / neck.pt / encoder.json as ``densessl pretrain`` writes them (BN stats set
    to non-trivial values so eval-mode features depend on every buffer)."""
    torch.manual_seed(0)
    # torchvision's FPN upsamples nearest: the exported neck matches it exactly only then
    enc = DenseEncoder("resnet18", 4, neck="fpn", neck_dim=32, fpn_upsample="nearest")
    for m in enc.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    save_torch(tmp_path / "encoder.pt", enc.backbone.state_dict())
    save_torch(tmp_path / "neck.pt", enc.neck.state_dict())
    write_json(tmp_path / "encoder.json", {
        "backbone": "resnet18", "in_channels": 4, "recipe": "t", "data_source": "x",
        "fpn_upsample": "nearest",
        "datasets": [{"name": "PIDray", "licence": "CC BY-NC 4.0"}]})
    return tmp_path / "encoder.pt", enc.eval()


def _x():
    return torch.rand(2, 4, 64, 64, generator=torch.Generator().manual_seed(1))


def test_torchvision_round_trip(weights, tmp_path):
    path, enc = weights
    out = export_weights(path, "torchvision", tmp_path / "tv.pt")
    model = torchvision.models.resnet18(weights=None)
    model.conv1 = nn.Conv2d(4, 64, 7, 2, 3, bias=False)
    model.fc = nn.Identity()
    result = model.load_state_dict(torch.load(out))
    assert not result.missing_keys and not result.unexpected_keys
    model.eval()
    with torch.no_grad():
        pooled = enc.backbone(_x())["c5"].mean((2, 3))
        assert torch.allclose(model(_x()), pooled, atol=1e-5)
    card = json.loads((tmp_path / "tv.pt.card.json").read_text())
    assert card["datasets"] == [{"name": "PIDray", "licence": "CC BY-NC 4.0"}]
    assert card["architecture"]["in_channels"] == 4 and card["versions"]["densessl"]
    assert "CC BY-NC 4.0" in (tmp_path / "tv.pt.card.md").read_text()


def test_torchvision_with_neck_is_a_detection_backbone(weights, tmp_path):
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    path, enc = weights
    out = export_weights(path, "torchvision", tmp_path / "tvfpn.pt", neck=True)
    net = torchvision.models.resnet18(weights=None, norm_layer=nn.BatchNorm2d)
    net.conv1 = nn.Conv2d(4, 64, 7, 2, 3, bias=False)
    body = BackboneWithFPN(net, {f"layer{i}": str(i - 1) for i in range(1, 5)},
                           [64, 128, 256, 512], 32, extra_blocks=LastLevelMaxPool())
    result = body.load_state_dict(torch.load(out))
    assert not result.missing_keys and not result.unexpected_keys
    body.eval()
    with torch.no_grad():
        assert torch.allclose(body(_x())["1"], enc(_x())["pyramid"]["p3"], atol=1e-5)


def test_centred_neck_export_warns_in_the_card(weights, tmp_path):
    path, _ = weights
    provenance = json.loads((tmp_path / "encoder.json").read_text())
    assert provenance["fpn_upsample"] == "nearest"
    export_weights(path, "torchvision", tmp_path / "plain.pt", neck=True)
    assert json.loads((tmp_path / "plain.pt.card.json").read_text())["warnings"] == []
    write_json(tmp_path / "encoder.json", {**provenance, "fpn_upsample": "centred"})
    export_weights(path, "torchvision", tmp_path / "centred.pt", neck=True)
    card = json.loads((tmp_path / "centred.pt.card.json").read_text())
    assert card["architecture"]["fpn_upsample"] == "centred"
    assert any("nearest" in w for w in card["warnings"])
    assert "Warning" in (tmp_path / "centred.pt.card.md").read_text()


def test_smp_round_trip(weights, tmp_path):
    path, enc = weights
    out = export_weights(path, "smp", tmp_path / "smp.pt")
    model = smp.Unet("resnet18", encoder_weights=None, in_channels=4, classes=2)
    state = torch.load(out)
    assert set(state) == set(model.encoder.state_dict())  # no missing, no unexpected keys
    model.encoder.load_state_dict(state, strict=True)  # smp's override returns None
    model.eval()
    with torch.no_grad():
        theirs, ours = model.encoder(_x()), enc.backbone(_x())
    for level, feat in zip(("c2", "c3", "c4", "c5"), theirs[2:]):
        assert torch.allclose(feat, ours[level], atol=1e-5), level


def test_timm_round_trip(weights, tmp_path):
    path, enc = weights
    out = export_weights(path, "timm", tmp_path / "timm.pt")
    model = timm.create_model("resnet18", pretrained=False, num_classes=0, in_chans=4)
    result = model.load_state_dict(torch.load(out))
    assert not result.missing_keys and not result.unexpected_keys
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.forward_features(_x()), enc.backbone(_x())["c5"], atol=1e-5)


def _detectron2_resnet_layout(depths, bottleneck, in_channels, fpn_dim):
    """detectron2's ResNet(+FPN) parameter names and shapes, written from its documentation
    (detectron2/modeling/backbone/resnet.py and fpn.py): ``stem.conv1`` + ``.norm``; stages
    ``res2..res5``; blocks ``convK`` each with ``convK.norm``; a projection ``shortcut`` (+
    ``.norm``) on the first block of a stage whose shape changes; FPN ``fpn_lateralK`` /
    ``fpn_outputK`` convs with bias."""
    layout = {"stem.conv1.weight": (64, in_channels, 7, 7)}
    norm = ("weight", "bias", "running_mean", "running_var")
    layout.update({f"stem.conv1.norm.{n}": (64,) for n in norm})
    in_ch, widths = 64, (64, 128, 256, 512)
    outs = []
    for stage, (depth, width) in enumerate(zip(depths, widths), start=2):
        out_ch = width * 4 if bottleneck else width
        for b in range(depth):
            p = f"res{stage}.{b}"
            if bottleneck:
                convs = [(width, in_ch, 1), (width, width, 3), (out_ch, width, 1)]
            else:
                convs = [(width, in_ch, 3), (width, width, 3)]
            for k, (o, i, s) in enumerate(convs, start=1):
                layout[f"{p}.conv{k}.weight"] = (o, i, s, s)
                layout.update({f"{p}.conv{k}.norm.{n}": (o,) for n in norm})
            if b == 0 and (in_ch != out_ch or stage > 2):
                layout[f"{p}.shortcut.weight"] = (out_ch, in_ch, 1, 1)
                layout.update({f"{p}.shortcut.norm.{n}": (out_ch,) for n in norm})
            in_ch = out_ch
        outs.append(out_ch)
    for level, ch in zip(range(2, 6), outs):
        layout[f"fpn_lateral{level}.weight"] = (fpn_dim, ch, 1, 1)
        layout[f"fpn_lateral{level}.bias"] = (fpn_dim,)
        layout[f"fpn_output{level}.weight"] = (fpn_dim, fpn_dim, 3, 3)
        layout[f"fpn_output{level}.bias"] = (fpn_dim,)
    return layout


def test_detectron2_layout(weights, tmp_path):
    path, enc = weights
    out = export_weights(path, "detectron2", tmp_path / "d2.pkl", neck=True)
    blob = pickle.loads(out.read_bytes())
    assert blob["matching_heuristics"] is True and "densessl" in blob["__author__"]
    got = {k: tuple(v.shape) for k, v in blob["model"].items()}
    assert got == _detectron2_resnet_layout((2, 2, 2, 2), False, 4, 32)
    sd = enc.backbone.state_dict()
    assert (blob["model"]["res3.0.shortcut.norm.running_var"]
            == sd["layer2.0.downsample.1.running_var"].numpy()).all()
    assert (blob["model"]["stem.conv1.norm.weight"] == sd["bn1.weight"].numpy()).all()


def test_detectron2_layout_resnet50(tmp_path):
    from densessl.models import ResNetBackbone

    save_torch(tmp_path / "encoder.pt", ResNetBackbone("resnet50").state_dict())
    out = export_weights(tmp_path / "encoder.pt", "detectron2", tmp_path / "r50.pkl")
    got = {k: tuple(v.shape) for k, v in pickle.loads(out.read_bytes())["model"].items()}
    expected = _detectron2_resnet_layout((3, 4, 6, 3), True, 3, 1)
    assert got == {k: v for k, v in expected.items() if not k.startswith("fpn")}


def test_bad_exports_are_one_line_errors(weights, tmp_path, capsys):
    path, _ = weights
    with pytest.raises(DensesslError, match="no FPN"):
        export_weights(path, "timm", tmp_path / "a.pt", neck=True)
    save_torch(tmp_path / "other.pt", {"weight": torch.zeros(3)})
    assert main(["export", str(tmp_path / "other.pt"), "--to", "smp", "--out",
                 str(tmp_path / "b.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: export:") and err.count("\n") == 1
    assert not (tmp_path / "b.pt").exists()
    assert main(["export", str(path), "--to", "smp", "--out", str(tmp_path / "c.pt")]) == 0
    assert (tmp_path / "c.pt").is_file() and (tmp_path / "c.pt.card.md").is_file()
