"""Detection transfer loads only what pretraining trained (issue 25, item 3).

Pretraining records, per module of the FPN neck and of InsLoc's box head, whether it ever
received a gradient (``encoder.json`` ``trained_modules``); the detector loads those modules
only, starts the others fresh, trains the fresh ones at the full learning rate and lists loaded
and fresh modules in results.json. The record is checked against an independent reference: the
parameters that changed between the initial and the final state of a real run (weight decay
0, so only a gradient moves a weight).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from helpers import make_sync_free
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead

import densessl.eval.finetune as finetune_module
import densessl.workflows.pretraining as pretraining_module
from densessl.data.labeled.build import build_eval_dataset
from densessl.errors import RecipeError
from densessl.eval.detection import build_detector, detector_modules
from densessl.eval.finetune import detection_box_head_spec, detection_start, run_one
from densessl.methods import DensePretraining
from densessl.models.neck import FPNNeck
from densessl.models.trained_modules import GradientRecord, module_units
from densessl.models.weights import EncoderInit, load_encoder_file
from densessl.recipe import load_recipe
from densessl.workflows.pretraining import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
FPN_DIM = 32
ALL_FPN = [f"fpn.{kind}_blocks.{i}" for kind in ("inner", "layer") for i in range(4)]
# dense-only at stride 8 reads p3: laterals of c3..c5 feed it, and p3's output conv; the p2
# lateral and the p2 / p4 / p5 output convs are never on a path to a loss
DENSE_P3 = ["fpn.inner_blocks.1", "fpn.inner_blocks.2", "fpn.inner_blocks.3",
            "fpn.layer_blocks.1"]
SAME_IMAGE = ["train.max_steps=2", "train.batch_size=4", "train.num_workers=0",
              "train.weight_decay=0", "data.options.num_images=8", "data.image_size=48",
              "augment.view_size=32", "loss.dense.queue_size=1000",
              "loss.global.queue_size=16", "model.split_bn_groups=2",
              f"model.neck_dim={FPN_DIM}"]


def _units_changed(before: dict[str, dict[str, torch.Tensor]], module: nn.Module) -> list[str]:
    """Units of ``module`` some parameter of which differs from ``before`` (no buffers: BN
    running statistics move without a gradient)."""
    changed = []
    for unit, sub in module_units(module).items():
        if any(not torch.equal(p.detach().cpu(), before[unit][n])
               for n, p in sub.named_parameters()):
            changed.append(unit)
    return changed


def _pretrain_with_reference(recipe, out: Path, overrides: list[str], monkeypatch):
    """A real pretraining run; returns the online neck / box head parameters at the start, per
    unit (taken as the task is built, before any step)."""
    initial: dict[str, dict] = {}

    class Snapshot(DensePretraining):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            box_head = getattr(getattr(self.encoder, "instance_head", None), "box_head", None)
            for part, module in (("neck", self.encoder.neck), ("box_head", box_head)):
                if module is not None:
                    initial[part] = {u: {n: p.detach().clone() for n, p in m.named_parameters()}
                                     for u, m in module_units(module).items()}

    monkeypatch.setattr(pretraining_module, "DensePretraining", Snapshot)
    pretrain(recipe, out, overrides=overrides, progress=False)
    monkeypatch.undo()
    return initial


def _final_task(out: Path) -> DensePretraining:
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu",
                            weights_only=False)
    task = DensePretraining(checkpoint["hyper_parameters"]["recipe"])
    task.load_state_dict(checkpoint["state_dict"])
    return task


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dense") / "run"
    with pytest.MonkeyPatch.context() as mp:
        initial = _pretrain_with_reference(RECIPES / "same_image.yaml", out, SAME_IMAGE, mp)
    return out, initial


def test_module_units_name_prefixes_of_the_state_dict_keys():
    neck = FPNNeck({"c2": 8, "c3": 8, "c4": 8, "c5": 8}, 8)
    assert list(module_units(neck)) == ALL_FPN
    assert list(module_units(neck.fpn)) == [u.removeprefix("fpn.") for u in ALL_FPN]
    for unit in module_units(neck):
        assert any(k.startswith(unit + ".") for k in neck.state_dict())
    head = FastRCNNConvFCHead((8, 3, 3), [8] * 4, [16], norm_layer=nn.BatchNorm2d)
    assert list(module_units(head)) == ["0", "1", "2", "3", "5"]  # 4: Flatten, 6: ReLU


def test_gradient_record_counts_finite_non_zero_gradients_only():
    a, b, c = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
    parts = nn.ModuleDict({"x": a, "y": b, "z": c})
    record = GradientRecord({"part": parts, "none": None})
    assert record.record() == {"part": []}
    a.weight.grad = torch.zeros(2, 2)  # zero: no gradient
    b.weight.grad = torch.full((2, 2), float("nan"))  # a step the guard drops
    record.observe()
    assert record.record() == {"part": []}
    a.bias.grad = torch.tensor([0.0, 1e-30])
    record.observe()
    a.weight.grad = a.bias.grad = b.weight.grad = None
    c.weight.grad = torch.ones(2, 2)
    record.observe()
    assert record.record() == {"part": ["x", "z"]}  # once trained, always trained
    entry = record.state_dict_entry()
    again = GradientRecord({"part": parts})
    again.load_entry(json.loads(json.dumps(entry)))
    assert again.record() == {"part": ["x", "z"]}
    again.load_entry(None)  # a checkpoint of a run without the record
    assert again.record() is None
    assert "seen" not in again.state_dict()  # checkpoints' state dicts keep their keys


def test_dense_pretraining_records_exactly_the_modules_whose_weights_moved(dense_run):
    out, initial = dense_run
    meta = json.loads((out / "encoder.json").read_text())
    task = _final_task(out)
    # independent reference: with weight decay 0 only a gradient moves a weight
    moved = _units_changed(initial["neck"], task.encoder.neck)
    assert meta["trained_modules"] == {"neck": moved}
    assert moved == DENSE_P3  # 4 of the FPN's 8 modules, as measured in issue 25
    # the record is neck.pt's key prefixes
    neck = torch.load(out / "neck.pt")
    assert all(any(k.startswith(u + ".") for k in neck) for u in moved)


def test_detector_loads_the_trained_modules_and_starts_the_others_fresh(dense_run):
    out, _ = dense_run
    rec = load_recipe(RECIPES / "same_image.yaml", SAME_IMAGE)
    init = load_encoder_file(out / "encoder.pt", rec.model.backbone, rec.data.channels)
    neck, box_head = detection_start(rec, init)
    assert box_head is None
    assert sorted({k.rsplit(".", 2)[0] for k in neck}) == DENSE_P3
    # default (auto) and true both load only what was trained
    strict = load_recipe(RECIPES / "same_image.yaml", SAME_IMAGE +
                         ["finetune.detection_neck=true"])
    assert detection_start(strict, init)[0].keys() == neck.keys()

    def build(neck_state):
        torch.manual_seed(1)
        return build_detector("faster_rcnn", rec.model.backbone, rec.data.channels, 3, 32,
                              [0.5] * 3, [0.25] * 3, fpn_dim=FPN_DIM, encoder_state=init.encoder,
                              neck_state=neck_state, fpn_upsample=rec.model.fpn_upsample)

    model, fresh = build(neck), build(None)
    assert model.loaded_modules == ["backbone", *DENSE_P3]
    assert model.loaded_groups == ["backbone", "fpn"]
    saved = torch.load(out / "neck.pt")
    mine, theirs = detector_modules(model), detector_modules(fresh)
    for unit in ALL_FPN:
        own = mine[unit].state_dict()
        from_file = {k.removeprefix(unit + "."): v for k, v in saved.items()
                     if k.startswith(unit + ".")}
        default = theirs[unit].state_dict()
        assert set(own) == set(from_file) == set(default)
        equal_file = all(torch.equal(own[k], from_file[k]) for k in own)
        equal_fresh = all(torch.equal(own[k], default[k]) for k in own)
        if unit in DENSE_P3:
            assert equal_file and not equal_fresh, unit
        else:  # neck.pt's copy is the pretraining's never-trained random init: not taken
            assert equal_fresh and not equal_file, unit


def test_fresh_modules_train_at_the_head_learning_rate(dense_run, monkeypatch, tmp_path):
    out, _ = dense_run
    tiny = ["finetune.tasks=[detection]", "finetune.image_size=32",
            "finetune.detection_steps=1", "finetune.batch_size=2", "finetune.seeds=[0]",
            "finetune.options={num_train: 2, num_val: 2, num_source: 0}",
            "finetune.lr=0.001", "finetune.encoder_lr_mult=0.1"]
    rec = load_recipe(RECIPES / "same_image.yaml", SAME_IMAGE + tiny)
    init = load_encoder_file(out / "encoder.pt", rec.model.backbone, rec.data.channels)
    data = build_eval_dataset("synthetic", rec.finetune.options, image_size=32)
    seen: dict = {}
    built = finetune_module.build_detector

    def spy_build(*args, **kwargs):
        seen["model"] = built(*args, **kwargs)
        return seen["model"]

    optimizer = finetune_module._optimizer

    def spy_optimizer(params, *args, **kwargs):
        params = list(params)
        seen["lr"] = {id(p): g["lr"] for g in params for p in g["params"]}
        return optimizer(params, *args, **kwargs)

    monkeypatch.setattr(finetune_module, "build_detector", spy_build)
    monkeypatch.setattr(finetune_module, "_optimizer", spy_optimizer)
    groups: dict = {}
    run_one(rec, data, init, "detection", "faster_rcnn", 1.0, 0,
            box_head_spec=detection_box_head_spec([init]), parameters=groups)
    fresh_fpn = [u for u in ALL_FPN if u not in DENSE_P3]
    assert groups == {"loaded": ["backbone", *DENSE_P3],
                      "fresh": [*fresh_fpn, "rpn", "box_head", "box_predictor"]}
    for name, module in detector_modules(seen["model"]).items():
        lrs = {seen["lr"][id(p)] for p in module.parameters() if p.requires_grad}
        want = 0.001 * 0.1 if name in groups["loaded"] else 0.001
        assert len(lrs) == 1 and lrs.pop() == pytest.approx(want), name


def test_record_survives_resume_and_repair(dense_run, tmp_path):
    out, _ = dense_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    ckpt = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=False)
    entry = checkpoint["trained_modules"]
    assert entry["seen"].count(True) == len(DENSE_P3)
    # as if a step before the checkpoint had trained p5's output conv: the resumed run must
    # carry that over (its own steps never touch it)
    entry["seen"][entry["names"].index(["neck", "fpn.layer_blocks.3"])] = True
    torch.save(checkpoint, ckpt)
    pretrain(RECIPES / "same_image.yaml", run, overrides=SAME_IMAGE + ["train.max_steps=3"],
             resume=True, progress=False)
    meta = json.loads((run / "encoder.json").read_text())
    carried = [*DENSE_P3, "fpn.layer_blocks.3"]
    assert meta["steps"] == 3 and meta["trained_modules"] == {"neck": carried}
    # a kill between the renames of a save: --resume at max_steps rewrites encoder.json
    (run / "encoder.json").unlink()
    pretrain(RECIPES / "same_image.yaml", run, overrides=SAME_IMAGE + ["train.max_steps=3"],
             resume=True, progress=False)
    assert json.loads((run / "encoder.json").read_text())["trained_modules"] == {
        "neck": carried}


def test_resume_from_a_checkpoint_without_the_record_records_nothing(dense_run, tmp_path):
    """The steps before the checkpoint were not observed: the record would be a guess."""
    out, _ = dense_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    ckpt = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=False)
    del checkpoint["trained_modules"]
    torch.save(checkpoint, ckpt)
    pretrain(RECIPES / "same_image.yaml", run, overrides=SAME_IMAGE + ["train.max_steps=3"],
             resume=True, progress=False)
    meta = json.loads((run / "encoder.json").read_text())
    assert meta["steps"] == 3 and "trained_modules" not in meta
    rec = load_recipe(RECIPES / "same_image.yaml", SAME_IMAGE)
    init = load_encoder_file(run / "encoder.pt", rec.model.backbone, rec.data.channels)
    assert detection_start(rec, init)[0] is init.neck  # loaded whole, as before the record
    assert finetune_module.unrecorded_parts(rec, init) == ["neck.pt"]


def test_true_refuses_a_part_with_no_trained_module(tmp_path):
    state = FPNNeck({"c2": 64, "c3": 128, "c4": 256, "c5": 512}, FPN_DIM).state_dict()
    recipe = {"model": {"neck_dim": FPN_DIM}}

    def init(units):
        return EncoderInit("pretrained", {}, state, {"trained_modules": {"neck": units}},
                           path=tmp_path / "encoder.pt")

    assert detection_start(load_recipe(recipe), init([]))[0] is None  # auto: a fresh FPN
    with pytest.raises(RecipeError, match="detection_neck: true, but no module of .*neck.pt "
                                          "received a gradient"):
        detection_start(load_recipe(recipe, ["finetune.detection_neck=true"]), init([]))
    with pytest.raises(Exception, match=r"lists \['fpn.nothing'\] but neck.pt has no weights"):
        detection_start(load_recipe(recipe), init(["fpn.nothing"]))
    assert finetune_module.unrecorded_parts(load_recipe(recipe), init([])) == []


def test_instance_objective_records_more_levels_than_dense_only(dense_run, tmp_path,
                                                                monkeypatch):
    """InsLoc pools every box on p2..p5: every FPN module and the whole box head train, and
    the detector loads all of them (the box head as one piece)."""
    out = tmp_path / "insloc"
    overrides = ["train.max_steps=2", "train.batch_size=4", "train.num_workers=0",
                 "train.weight_decay=0", "model.split_bn_groups=2", "data.image_size=64",
                 "augment.view_size=48", "loss.instance.roi_head_fc_dim=32",
                 f"model.neck_dim={FPN_DIM}",
                 f"pairs.options.cache_dir={tmp_path / 'cache'}"]
    initial = _pretrain_with_reference(RECIPES / "xray_insloc.yaml", out, overrides,
                                       monkeypatch)
    task = _final_task(out)
    meta = json.loads((out / "encoder.json").read_text())
    record = meta["trained_modules"]
    assert record == {
        "neck": _units_changed(initial["neck"], task.encoder.neck),
        "box_head": _units_changed(initial["box_head"], task.encoder.instance_head.box_head)}
    assert record == {"neck": ALL_FPN, "box_head": ["0", "1", "2", "3", "5"]}
    dense = json.loads((dense_run[0] / "encoder.json").read_text())["trained_modules"]
    assert set(dense["neck"]) < set(record["neck"])
    rec = load_recipe(RECIPES / "xray_insloc.yaml", overrides)
    init = load_encoder_file(out / "encoder.pt", rec.model.backbone, rec.data.channels)
    neck, box_head = detection_start(rec, init)
    model = build_detector("faster_rcnn", rec.model.backbone, rec.data.channels, 3, 64,
                           [0.5] * 3, [0.25] * 3, fpn_dim=FPN_DIM, encoder_state=init.encoder,
                           neck_state=neck, fpn_upsample=rec.model.fpn_upsample,
                           box_head_spec=detection_box_head_spec([init]),
                           box_head_state=box_head)
    assert model.loaded_modules == ["backbone", *ALL_FPN, "box_head"]


def test_exported_neck_card_warns_of_untrained_modules(dense_run, tmp_path):
    from densessl.workflows.export import export_weights

    out, _ = dense_run
    export_weights(out / "encoder.pt", "torchvision", tmp_path / "r18.pth", neck=True)
    card = json.loads((tmp_path / "r18.pth.card.json").read_text())
    warning = [w for w in card["warnings"] if "never received a gradient" in w]
    assert len(warning) == 1
    for unit in ALL_FPN:
        assert (repr(unit) in warning[0]) == (unit not in DENSE_P3), unit


def test_observing_gradients_reads_nothing_on_the_host():
    """The per-step observation costs no host-device sync (tests/methods/test_sync_free_step.py's
    check: under FakeTensorMode any value read on the host raises)."""
    from helpers import pair_batch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from densessl.bench.training import bench_recipe

    torch.manual_seed(0)
    recipe = bench_recipe("resnet18", 64, 4, dense={"queue_size": 16},
                          instance={"weight": 1.0, "queue_size": 8, "roi_levels": "all",
                                    "box_jitter": True, "roi_head": "conv",
                                    "roi_head_fc_dim": 32})
    batch = pair_batch(recipe, torch.device("cpu"), with_instances=True)
    task = DensePretraining(recipe)
    make_sync_free(task)
    task.compute_losses(batch)[0].backward()  # a real step first, as in training
    task.on_before_optimizer_step(None)
    assert task.trained_modules() == {"neck": ALL_FPN, "box_head": ["0", "1", "2", "3", "5"]}
    with FakeTensorMode(allow_non_fake_inputs=True):
        task.model.zero_grad(set_to_none=True)
        task.compute_losses(batch)[0].backward()
        task.on_before_optimizer_step(None)
