"""ImageNet weights, read offline: ``finetune.inits: imagenet`` (a results row with its paired
differences, the fine-tuned encoder starting from the file), ``model.init_weights`` (online and
momentum backbones start from the file), the clear error when the weights are absent (before
anything is written), the first-conv channel adaptation against an independent computation,
and timm backbones. The weights are random tensors the test writes under the real file names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torchvision

import densessl.eval.finetune as finetune_module
import densessl.workflows.pretraining as pretraining_module
from densessl.cli import main
from densessl.errors import DensesslError
from densessl.eval.inits import imagenet_init
from densessl.eval.report import build_results, results_table
from densessl.methods import DensePretraining
from densessl.models import ResNetBackbone
from densessl.models.imagenet import normalisation_note, start_weights
from densessl.recipe import load_recipe
from densessl.workflows.experiment import finetune
from densessl.workflows.pretraining import pretrain

SAME_IMAGE = str(Path(__file__).parents[2] / "recipes" / "same_image.yaml")
TV_FILE = "resnet18-f37072fd.pth"  # what torchvision.models.resnet18(weights=...) downloads
FETCH = "torchvision.models.resnet18(weights='IMAGENET1K_V1')"

PRETRAIN = ["data.image_size=32", "data.options.num_images=8", "augment.view_size=32",
            "train.max_steps=1", "train.batch_size=4", "train.num_workers=0",
            "loss.dense.queue_size=64", "loss.global.queue_size=16", "model.split_bn_groups=2"]
FINETUNE = ["finetune.image_size=32", "finetune.steps=2", "finetune.batch_size=4",
            "finetune.seeds=[0]", "finetune.num_threads=1", "finetune.tasks=[segmentation]",
            "finetune.options={num_train: 8, num_val: 4, num_source: 0}"]


def _state_file(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision resnet18 state dict (fc included, as torchvision ships it) with known
    random values, BatchNorm statistics too, saved to ``path``."""
    torch.manual_seed(seed)
    state = torchvision.models.resnet18().state_dict()
    state = {k: (torch.randn_like(v) if v.is_floating_point() else v) for k, v in state.items()}
    state = {k: (v.abs() + 0.5 if k.endswith("running_var") else v) for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def _assert_equal(state: dict, expected: dict) -> None:
    expected = {k: v for k, v in expected.items() if not k.startswith("fc.")}
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """A torch hub cache that holds nothing (whatever this machine has cached)."""
    monkeypatch.delenv("TORCH_HOME", raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_finetune_imagenet_row_and_differences(tmp_path, monkeypatch, empty_hub, one_thread):
    weights = _state_file(tmp_path / "weights" / TV_FILE)
    pretrained = tmp_path / "encoder.pt"
    torch.manual_seed(1)
    torch.save(ResNetBackbone("resnet18").state_dict(), pretrained)
    built = []
    real = finetune_module.build_segmentation_model

    def spy(arch, backbone, channels, classes, encoder_state=None):
        model = real(arch, backbone, channels, classes, encoder_state)
        built.append((encoder_state, {k: v.clone() for k, v in
                                      model.encoder.state_dict().items()}))
        return model

    monkeypatch.setattr(finetune_module, "build_segmentation_model", spy)
    results = finetune(SAME_IMAGE, pretrained, tmp_path / "out", log=lambda _: None,
                       overrides=PRETRAIN + FINETUNE + [
                           "finetune.inits=[pretrained,imagenet,random]",
                           f"model.weights_file={tmp_path / 'weights' / TV_FILE}"])
    assert [k for k in results if k not in ("differences", "protocol", "data")] == [
        "floor", "pretrained", "imagenet", "random"]
    assert 0 <= results["imagenet"]["segmentation/fpn@100%"]["mIoU"] <= 1
    diffs = results["differences"]
    assert set(diffs) == {"pretrained - random", "imagenet - random", "pretrained - imagenet"}
    cell = "segmentation/fpn@100%"
    assert diffs["pretrained - imagenet"][cell]["mIoU"]["mean"] == pytest.approx(
        results["pretrained"][cell]["mIoU"] - results["imagenet"][cell]["mIoU"])
    assert results["protocol"]["labels"]["imagenet"].startswith(
        "ImageNet-1k class labels (torchvision ResNet18_Weights.IMAGENET1K_V1")
    assert results["imagenet"][cell]["parameters"]["loaded"] == ["encoder"]
    # the imagenet model's encoder, before any training step, is the file's (fc dropped)
    imagenet_built = [s for state, s in built if state is not None
                      and torch.equal(state["conv1.weight"], weights["conv1.weight"])]
    assert len(imagenet_built) == 1
    _assert_equal(imagenet_built[0], weights)
    table = (tmp_path / "out" / "results.md").read_text()
    assert "pretrained - imagenet [95 % CI]" in table and "imagenet - random" in table
    runs = json.loads((tmp_path / "out" / "runs.json").read_text())
    record = runs["imagenet_weights"]
    assert record["from"] == "imagenet" and record["file"].endswith(TV_FILE)
    assert len(record["sha256"]) == 64 and record["first_conv"] is None


def test_imagenet_init_reads_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_HOME", raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert Path(torch.hub.get_dir()) == tmp_path / "torch" / "hub"
    weights = _state_file(tmp_path / "torch" / "hub" / "checkpoints" / TV_FILE, seed=3)
    init = imagenet_init(load_recipe(SAME_IMAGE, ["finetune.inits=[imagenet]"]))
    assert init.name == "imagenet"
    assert init.provenance["file"] == str(tmp_path / "torch" / "hub" / "checkpoints" / TV_FILE)
    _assert_equal(init.encoder, weights)


def test_pretraining_starts_from_the_file(tmp_path, monkeypatch, empty_hub, one_thread):
    weights = _state_file(tmp_path / TV_FILE, seed=2)
    seen = {}

    class Spy(DensePretraining):
        def on_train_start(self):
            seen["online"] = {k: v.clone() for k, v in
                              self.model.online.backbone.state_dict().items()}
            seen["momentum"] = {k: v.clone() for k, v in
                                self.model.momentum.backbone.state_dict().items()}

    monkeypatch.setattr(pretraining_module, "DensePretraining", Spy)
    metrics = pretrain(SAME_IMAGE, tmp_path / "out", overrides=PRETRAIN + [
        "model.init_weights=imagenet", f"model.weights_file={tmp_path / TV_FILE}"],
        progress=False)
    _assert_equal(seen["online"], weights)
    _assert_equal(seen["momentum"], weights)
    record = metrics["init_weights"]
    assert record["from"] == "imagenet" and record["file"] == str(tmp_path / TV_FILE)
    assert record["weights"] == "torchvision ResNet18_Weights.IMAGENET1K_V1"
    encoder_json = json.loads((tmp_path / "out" / "encoder.json").read_text())
    assert encoder_json["init_weights"] == record
    # a pretraining that starts random says so
    plain = pretrain(SAME_IMAGE, tmp_path / "plain", overrides=PRETRAIN, progress=False)
    assert plain["init_weights"] == {"from": "random"}


def test_init_weights_path_is_an_encoder_file(tmp_path):
    torch.manual_seed(4)
    encoder = ResNetBackbone("resnet18", 4).state_dict()
    torch.save(encoder, tmp_path / "encoder.pt")
    state, record = start_weights("resnet18", 4, str(tmp_path / "encoder.pt"), None,
                                  "model.init_weights")
    _assert_equal(state, encoder)
    assert record["from"] == "file" and record["first_conv"] is None
    with pytest.raises(DensesslError, match="model.init_weights: .*nope.pt' not found"):
        start_weights("resnet18", 3, str(tmp_path / "nope.pt"), None, "model.init_weights")


def test_absent_weights_stop_run_before_anything_is_written(tmp_path, empty_hub, capsys):
    out = tmp_path / "run"
    args = ["run", SAME_IMAGE, "--out", str(out)]
    for s in PRETRAIN + FINETUNE + ["finetune.inits=[pretrained,imagenet,random]"]:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for text in (TV_FILE, "model.weights_file", str(empty_hub / "checkpoints" / TV_FILE),
                 FETCH, "never downloads"):
        assert text in err, text
    assert not out.exists()
    # model.init_weights: imagenet alone: pretrain refuses before writing its folder
    with pytest.raises(DensesslError, match="model.init_weights: imagenet needs .*"
                       + TV_FILE.replace(".", r"\.")):
        pretrain(SAME_IMAGE, tmp_path / "pre", overrides=PRETRAIN + [
            "model.init_weights=imagenet"], progress=False)
    assert not (tmp_path / "pre").exists()
    # a model.weights_file that is not there is named as such
    with pytest.raises(DensesslError, match="model.weights_file: .*missing.pth' not found"):
        imagenet_init(load_recipe(SAME_IMAGE, [f"model.weights_file={tmp_path}/missing.pth"]))


@pytest.mark.parametrize("channels", [1, 2, 4, 13])
def test_first_conv_adapted_to_the_channels(tmp_path, channels):
    weights = _state_file(tmp_path / TV_FILE, seed=5)
    state, record = start_weights("resnet18", channels, "imagenet", str(tmp_path / TV_FILE),
                                  "finetune.inits: imagenet")
    rgb = weights["conv1.weight"]
    if channels == 1:
        expected = rgb[:, 0:1] + rgb[:, 1:2] + rgb[:, 2:3]
    else:  # channel i takes RGB channel i mod 3, scaled by 3 / C
        expected = torch.stack([rgb[:, i % 3] for i in range(channels)], 1) * 3 / channels
    assert state["conv1.weight"].shape == (64, channels, 7, 7)
    assert torch.allclose(state["conv1.weight"], expected, atol=1e-6)
    assert record["first_conv"]["keys"] == ["conv1.weight"]
    assert record["first_conv"]["to_channels"] == channels
    assert ("sum" in record["first_conv"]["rule"]) == (channels == 1)
    rest = {k: v for k, v in weights.items() if k != "conv1.weight"}
    _assert_equal({k: v for k, v in state.items() if k != "conv1.weight"}, rest)
    ResNetBackbone("resnet18", channels).load_state_dict(state)  # loads as is


def test_timm_weights_file(tmp_path, monkeypatch):
    # timm:resnet18's features_only keys are its classifier model's minus fc
    torch.manual_seed(6)
    model = timm.create_model("resnet18", pretrained=False)
    torch.save(model.state_dict(), tmp_path / "resnet18.pth")
    recipe = load_recipe(SAME_IMAGE, ["model.backbone=timm:resnet18",
                                      f"model.weights_file={tmp_path / 'resnet18.pth'}"])
    init = imagenet_init(recipe)
    _assert_equal(init.encoder, model.state_dict())
    assert init.provenance["weights"].startswith("timm resnet18.")
    # convnext_atto's checkpoint has other names (stem.0 → stem_0): timm maps them, and
    # adapts the patchify stem to 4 channels
    atto = timm.create_model("convnext_atto", pretrained=False)
    torch.save(atto.state_dict(), tmp_path / "atto.pth")
    state, record = start_weights("timm:convnext_atto", 4, "imagenet",
                                  str(tmp_path / "atto.pth"), "finetune.inits: imagenet")
    source = atto.state_dict()
    stem = source["stem.0.weight"]
    assert torch.allclose(state["stem_0.weight"],
                          torch.cat([stem, stem[:, :1]], 1) * 3 / 4, atol=1e-6)
    assert torch.equal(state["stages_3.blocks.1.mlp.fc2.weight"],
                       source["stages.3.blocks.1.mlp.fc2.weight"])
    assert record["first_conv"]["keys"] == ["stem.0.weight"]
    # the Hugging Face cache a timm download fills is found without model.weights_file
    import huggingface_hub.constants
    from safetensors.torch import save_file

    hub = tmp_path / "hf"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    repo = hub / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(repo / "snapshots" / "abc123" / "model.safetensors"))
    init = imagenet_init(load_recipe(SAME_IMAGE, ["model.backbone=timm:resnet18"]))
    assert init.provenance["file"].endswith("model.safetensors")
    _assert_equal(init.encoder, model.state_dict())


def test_pretrained_minus_imagenet_in_results_and_note():
    raw = {name: {"linear_probe@100%": [{"mIoU": v + 0.1 * i} for i in range(3)]}
           for name, v in (("pretrained", 0.5), ("imagenet", 0.4), ("random", 0.2))}
    results = build_results(raw)
    diff = results["differences"]["pretrained - imagenet"]["linear_probe@100%"]["mIoU"]
    assert diff["mean"] == pytest.approx(0.1) and diff["n"] == 3
    assert "imagenet - random" in results["differences"]
    assert "pretrained - imagenet [95 % CI]" in results_table(results)
    # without an imagenet row there is no such column
    del raw["imagenet"]
    assert set(build_results(raw)["differences"]) == {"pretrained - random"}
    recipe = load_recipe(SAME_IMAGE, ["finetune.inits=[imagenet]"])
    assert "ImageNet normalisation" in normalisation_note(recipe)
    imagenet = load_recipe(SAME_IMAGE, ["augment.mean=[0.485,0.456,0.406]",
                                        "augment.std=[0.229,0.224,0.225]"])
    assert normalisation_note(imagenet) is None
