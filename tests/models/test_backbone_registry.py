"""The backbone registry (densessl.models.backbones): each spec against what its backbone
measurably is. Channels and strides against the feature maps of a forward pass on a 64×64
input, the smp encoder name against an smp Unet that takes the spec's ``to_smp_state`` weights
with no missing key, the export targets against densessl export's, and unknown names against
the RecipeError that lists the valid ones. resnet18 plus two tiny timm CNNs (a centre-aligned
ResNet, a block-aligned ConvNeXt)."""

from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import torch

from densessl.errors import RecipeError
from densessl.models import DenseEncoder
from densessl.models.backbones import build_backbone, get_backbone_spec, list_backbones

NAMES = ["resnet18", "timm:resnet10t", "timm:convnext_atto"]
C = 4  # not 3: the stem is rebuilt for it
SIZE = 64


def _x(batch=2):
    return torch.rand(batch, C, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", NAMES)
def test_channels_and_strides_are_the_feature_maps(name):
    spec = get_backbone_spec(name)
    torch.manual_seed(0)
    backbone = spec.build(C).eval()
    with torch.no_grad():
        feats = backbone(_x())
    assert list(feats) == ["c2", "c3", "c4", "c5"] == list(spec.channels) == list(spec.strides)
    assert {k: f.shape[1] for k, f in feats.items()} == spec.channels
    assert {k: SIZE // f.shape[-1] for k, f in feats.items()} == spec.strides
    assert {k: SIZE // f.shape[-2] for k, f in feats.items()} == spec.strides
    # the module says the same as its entry (the FPN and the cell grid read the module's)
    assert backbone.channels == spec.channels and backbone.strides == spec.strides
    assert backbone.cell_alignment == spec.cell_alignment
    # an encoder.pt of this backbone has the keys and shapes of the built module
    ref = spec.reference_state(C)
    assert {k: v.shape for k, v in ref.items()} == {
        k: v.shape for k, v in backbone.state_dict().items()}


def test_cell_alignment_and_families():
    expected = {"resnet18": ("torchvision", "centre", "resnet18"),
                "timm:resnet10t": ("timm", "centre", "tu-resnet10t"),
                "timm:convnext_atto": ("timm", "block", "tu-convnext_atto")}
    for name, (family, alignment, smp_name) in expected.items():
        spec = get_backbone_spec(name)
        assert (spec.family, spec.cell_alignment, spec.smp_encoder) == (family, alignment,
                                                                         smp_name)
        assert spec.name == name
    assert get_backbone_spec("timm:convnext_atto").model_name == "convnext_atto"
    assert get_backbone_spec("resnet50").channels == {"c2": 256, "c3": 512, "c4": 1024,
                                                     "c5": 2048}
    assert DenseEncoder("timm:convnext_atto", C, global_head=False).cell_alignment == "block"


@pytest.mark.parametrize("name", NAMES)
def test_smp_encoder_takes_the_weights(name):
    spec = get_backbone_spec(name)
    torch.manual_seed(0)
    state = spec.build(C).state_dict()
    model = smp.Unet(encoder_name=spec.smp_encoder, encoder_weights=None, in_channels=C,
                     classes=2)
    smp_state = spec.to_smp_state(state)
    own = model.encoder.state_dict()
    assert sorted(set(own) - set(smp_state)) == []  # no encoder key left at its init
    assert sorted(set(smp_state) - set(own)) == []
    model.encoder.load_state_dict(smp_state, strict=True)
    assert spec.from_smp_state(spec.to_smp_state(state)).keys() == state.keys()
    # every encoder tensor is ours
    loaded = model.encoder.state_dict()
    for key, value in spec.to_smp_state(state).items():
        assert torch.equal(loaded[key], value)


def test_export_targets_match_densessl_export():
    from densessl.workflows.export import TARGETS

    assert set(get_backbone_spec("resnet18").export_targets) == set(TARGETS)
    # torchvision and detectron2 have no timm architectures
    assert set(get_backbone_spec("timm:convnext_atto").export_targets) == {"timm", "smp"}


def test_timm_specs_build_nothing():
    """A timm spec is read off the architecture (meta device): the caller's random state is
    untouched and no weights are allocated or downloaded."""
    before = torch.get_rng_state()
    spec = get_backbone_spec("timm:regnetx_002")
    assert torch.equal(torch.get_rng_state(), before)
    assert spec.strides == {"c2": 4, "c3": 8, "c4": 16, "c5": 32}
    assert get_backbone_spec("timm:regnetx_002") is spec  # resolved once per name


def test_unknown_names_list_the_valid_ones():
    assert list_backbones() == ["resnet18", "resnet34", "resnet50", "timm:<name>"]
    for bad in ("resnet19", "vgg16", ""):
        with pytest.raises(RecipeError, match=r"model\.backbone: unknown backbone.*valid: "
                                              r"resnet18, resnet34, resnet50 or timm:<name>"):
            get_backbone_spec(bad)
    with pytest.raises(RecipeError, match="did you mean resnet18"):
        build_backbone("resnet19")
    with pytest.raises(RecipeError, match=r"not a timm model name \(did you mean "
                                          r"timm:convnext_atto\?\).*valid: resnet18"):
        get_backbone_spec("timm:convnext_attto")
    with pytest.raises(RecipeError, match=r"timm:vit_tiny_patch16_224 has feature strides "
                                          r"\[16, 16, 16\].*stride 4 is missing"):
        get_backbone_spec("timm:vit_tiny_patch16_224")
