"""The detector gets what was pretrained: encoder.pt, neck.pt and box_head.pt load key for key,
finetune.detection_neck / detection_box_head choose (auto / true / false), and results.json
says which parameter groups started from the weights and which started fresh."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from helpers import randomise_bn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead

from densessl.data.labeled.build import build_eval_dataset
from densessl.errors import RecipeError
from densessl.eval.detection import build_detector
from densessl.eval.finetune import detection_box_head_spec, detection_start, run_one
from densessl.models import DenseEncoder
from densessl.models.box_head import build_conv_fc_head, conv_fc_head_spec
from densessl.models.instance_head import InstanceHead
from densessl.models.weights import EncoderInit, load_encoder_file
from densessl.recipe import load_recipe
from densessl.workflows.experiment import finetune
from densessl.workflows.pretraining import export_encoder

FPN_DIM, ROI, FC = 32, 5, 64
# What InstanceHead(head="conv") is documented to build: 4 convs of the FPN width, one fc.
SPEC = {"input_size": [FPN_DIM, ROI, ROI], "conv_layers": [FPN_DIM] * 4, "fc_layers": [FC],
        "norm_layer": "BatchNorm2d"}
RECIPE = {"model": {"neck_dim": FPN_DIM}}
# results.json names the detector's FPN module by module
FPN = [f"fpn.{kind}_blocks.{i}" for kind in ("inner", "layer") for i in range(4)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _pretrain_dir(path, neck="fpn", box_head=True, upsample="centred"):
    """A pretraining output as ``densessl pretrain`` exports it (export_encoder on an encoder
    carrying the instance objective's head)."""
    torch.manual_seed(0)
    enc = DenseEncoder("resnet18", 3, neck=neck, neck_dim=FPN_DIM, fpn_upsample=upsample)
    if box_head:
        enc.instance_head = InstanceHead(FPN_DIM, out_dim=16, output_size=ROI, head="conv",
                                         fc_dim=FC)
    randomise_bn(enc)
    path.mkdir(parents=True, exist_ok=True)
    export_encoder(SimpleNamespace(encoder=enc), path, {"backbone": "resnet18",
                                                        "in_channels": 3})
    return path / "encoder.pt"


def test_box_head_spec_reads_the_construction_parameters():
    for norm, name in ((nn.BatchNorm2d, "BatchNorm2d"), (None, None)):
        head = FastRCNNConvFCHead((8, 3, 3), [16, 12], [20, 24], norm_layer=norm)
        spec = conv_fc_head_spec(head)
        assert spec == {"input_size": [8, 3, 3], "conv_layers": [16, 12], "fc_layers": [20, 24],
                        "norm_layer": name}
        rebuilt = build_conv_fc_head(spec)
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
            k: v.shape for k, v in head.state_dict().items()}
    with pytest.raises(ValueError, match="norm_layer"):
        build_conv_fc_head({**spec, "norm_layer": "GroupNorm"})


def test_export_writes_neck_and_box_head_with_their_parameters(tmp_path):
    weights = _pretrain_dir(tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "encoder.json").read_text())
    assert meta["fpn_upsample"] == "centred" and meta["neck_dim"] == FPN_DIM
    assert meta["box_head"] == SPEC
    # a torchvision ResNet pads its strided layers symmetrically: cell i sits on pixel s·i
    assert meta["cell_alignment"] == "centre"
    init = load_encoder_file(weights, "resnet18", 3)
    assert init.box_head is not None and init.neck is not None and init.path == weights
    # a later run without those parts in the same directory leaves no stale files behind
    _pretrain_dir(tmp_path / "p", neck="none", box_head=False)
    assert not (tmp_path / "p" / "neck.pt").exists()
    assert not (tmp_path / "p" / "box_head.pt").exists()
    assert "box_head" not in json.loads((tmp_path / "p" / "encoder.json").read_text())


@pytest.mark.parametrize("arch", ["faster_rcnn", "mask_rcnn"])
def test_detector_tensors_equal_the_pretrained_ones(tmp_path, arch):
    weights = _pretrain_dir(tmp_path)
    init = load_encoder_file(weights, "resnet18", 3)
    recipe = load_recipe(RECIPE)
    neck, box_head = detection_start(recipe, init)
    torch.manual_seed(1)
    model = build_detector(arch, "resnet18", 3, 4, 64, [0.5] * 3, [0.25] * 3, fpn_dim=FPN_DIM,
                           encoder_state=init.encoder, neck_state=neck,
                           box_head_spec=detection_box_head_spec([init]),
                           box_head_state=box_head)
    assert model.loaded_groups == ["backbone", "fpn", "box_head"]
    saved = {name: torch.load(tmp_path / f"{name}.pt") for name in ("encoder", "neck",
                                                                    "box_head")}
    saved["neck"] = {k.removeprefix("fpn."): v for k, v in saved["neck"].items()}
    for name, module in (("encoder", model.backbone.body), ("neck", model.backbone.fpn),
                         ("box_head", model.roi_heads.box_head)):
        own = module.state_dict()
        assert set(own) == set(saved[name]), name
        for key, value in saved[name].items():
            assert torch.equal(own[key], value), f"{name}: {key}"
    assert isinstance(model.roi_heads.box_head, FastRCNNConvFCHead)
    assert model.backbone.fpn.upsample == "centred"
    cls = model.roi_heads.box_predictor.cls_score
    assert (cls.in_features, cls.out_features) == (FC, 5)  # K + background
    assert model.roi_heads.box_roi_pool.output_size == (ROI, ROI)
    model.train()
    target = {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([2])}
    if arch == "mask_rcnn":
        target["masks"] = torch.zeros(1, 64, 64, dtype=torch.uint8)
        target["masks"][0, 6:40, 4:30] = 1
    losses = model([torch.rand(3, 64, 64)] * 2, [target] * 2)
    assert all(torch.isfinite(v) for v in losses.values())


def test_auto_true_false(tmp_path):
    full = load_encoder_file(_pretrain_dir(tmp_path / "full"), "resnet18", 3)
    bare = load_encoder_file(_pretrain_dir(tmp_path / "bare", neck="none", box_head=False),
                             "resnet18", 3)

    def start(init, **cfg):
        sets = [f"finetune.{k}={str(v).lower()}" for k, v in cfg.items()]
        return detection_start(load_recipe(RECIPE, sets), init)

    neck, head = start(full)  # default: auto
    assert neck is full.neck and head is full.box_head
    assert start(full, detection_neck=True, detection_box_head=True) == (full.neck,
                                                                         full.box_head)
    assert start(full, detection_neck=False) == (None, full.box_head)
    assert start(full, detection_box_head=False) == (full.neck, None)
    assert start(bare) == (None, None)
    assert start(bare, detection_neck=False, detection_box_head=False) == (None, None)
    with pytest.raises(RecipeError, match=f"detection_neck: true, but {tmp_path / 'bare'}"
                                          f"/neck.pt does not exist"):
        start(bare, detection_neck=True)
    with pytest.raises(RecipeError, match="bare/box_head.pt does not exist"):
        start(bare, detection_box_head=True)
    # nothing to load, nothing required: an init not read from a file
    assert start(EncoderInit("random"), detection_neck=True) == (None, None)
    with pytest.raises(RecipeError, match="detection_neck"):
        load_recipe(RECIPE, ["finetune.detection_neck=maybe"])


def test_upsampling_of_the_weights_must_match_the_recipe(tmp_path):
    init = load_encoder_file(_pretrain_dir(tmp_path, upsample="nearest"), "resnet18", 3)
    with pytest.raises(RecipeError, match="model.fpn_upsample: the recipe has 'centred' but "
                                          "the neck was pretrained with 'nearest'"):
        detection_start(load_recipe(RECIPE), init)
    recipe = load_recipe(RECIPE, ["model.fpn_upsample=nearest"])
    assert detection_start(recipe, init)[0] is init.neck
    no_neck = load_recipe(RECIPE, ["finetune.detection_neck=false"])
    assert detection_start(no_neck, init)[0] is None  # a fresh FPN has nothing to mismatch


TINY = ["finetune.tasks=[detection]", "finetune.image_size=32", "finetune.detection_steps=1",
        "finetune.batch_size=2", "finetune.seeds=[0]", "finetune.num_threads=1",
        "finetune.options={num_train: 2, num_val: 2, num_source: 0}"]


def test_results_list_loaded_and_fresh_groups(tmp_path):
    weights = _pretrain_dir(tmp_path / "p")
    results = finetune(RECIPE, weights, tmp_path / "o",
                       overrides=TINY + ["finetune.inits=[pretrained,random]"],
                       log=lambda _: None)
    on_disk = json.loads((tmp_path / "o" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    key = "detection/faster_rcnn@100%"
    # these weights do not record which modules were trained (export_encoder of a bare
    # encoder): neck.pt and box_head.pt load whole, and the results say so
    assert on_disk["pretrained"][key]["parameters"] == {
        "loaded": ["backbone", *FPN, "box_head"], "fresh": ["rpn", "box_predictor"],
        "trained_modules": "not recorded"}
    assert on_disk["random"][key]["parameters"] == {
        "loaded": [], "fresh": ["backbone", *FPN, "rpn", "box_head", "box_predictor"]}
    assert "box_mAP" in on_disk["random"][key]


def test_run_records_what_it_loaded_not_what_exists(tmp_path):
    """With detection_neck false the FPN is fresh although neck.pt exists; segmentation loads
    the encoder only."""
    init = load_encoder_file(_pretrain_dir(tmp_path / "p"), "resnet18", 3)
    recipe = load_recipe(RECIPE, TINY + ["finetune.detection_neck=false"])
    data = build_eval_dataset("synthetic", recipe.finetune.options, image_size=32)
    groups: dict = {}
    run_one(recipe, data, init, "detection", "faster_rcnn", 1.0, 0,
            box_head_spec=detection_box_head_spec([init]), parameters=groups)
    assert groups == {"loaded": ["backbone", "box_head"],
                      "fresh": [*FPN, "rpn", "box_predictor"],
                      "trained_modules": "not recorded"}
    seg = load_recipe(RECIPE, TINY + ["finetune.tasks=[segmentation]", "finetune.steps=1"])
    run_one(seg, data, init, "segmentation", "fpn", 1.0, 0, parameters=groups)
    assert groups == {"loaded": ["encoder"], "fresh": ["decoder", "segmentation_head"]}


def test_overrides_leave_the_callers_recipe_dict_alone():
    recipe = {"model": {"neck_dim": 32}}
    assert load_recipe(recipe, ["model.fpn_upsample=nearest"]).model.fpn_upsample == "nearest"
    assert recipe == {"model": {"neck_dim": 32}}


@pytest.mark.slow
def test_insloc_pretraining_hands_its_box_head_to_the_detector(tmp_path):
    """The real thing: two InsLoc steps, then the detector's FPN and box head hold exactly the
    online encoder's tensors from the Lightning checkpoint (read apart from the export)."""
    from pathlib import Path

    from densessl.workflows.pretraining import pretrain

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "xray_insloc.yaml"
    out = tmp_path / "run"
    pretrain(recipe, out, overrides=[
        "train.max_steps=2", "train.batch_size=4", "train.num_workers=0", "model.split_bn_groups=2",
        "data.image_size=64", "augment.view_size=48", "loss.instance.roi_head_fc_dim=32",
        f"pairs.options.cache_dir={tmp_path / 'cache'}"], progress=False)
    rec = load_recipe(recipe)
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["fpn_upsample"] == rec.model.fpn_upsample
    assert meta["box_head"]["fc_layers"] == [32]
    init = load_encoder_file(out / "encoder.pt", rec.model.backbone, rec.data.channels)
    neck, box_head = detection_start(rec, init)
    model = build_detector("faster_rcnn", rec.model.backbone, rec.data.channels, 3, 64,
                           [0.5] * rec.data.channels, [0.25] * rec.data.channels,
                           fpn_dim=rec.model.neck_dim, encoder_state=init.encoder,
                           neck_state=neck, fpn_upsample=rec.model.fpn_upsample,
                           box_head_spec=detection_box_head_spec([init]),
                           box_head_state=box_head)
    assert model.loaded_groups == ["backbone", "fpn", "box_head"]
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)["state_dict"]
    for prefix, module in (("model.online.neck.fpn.", model.backbone.fpn),
                           ("model.online.instance_head.box_head.", model.roi_heads.box_head)):
        own = module.state_dict()
        trained = {k.removeprefix(prefix): v for k, v in ckpt.items() if k.startswith(prefix)}
        assert set(trained) == set(own), prefix
        for key, value in trained.items():
            assert torch.equal(own[key], value), prefix + key
