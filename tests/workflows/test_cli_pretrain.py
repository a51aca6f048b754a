"""End to end through the CLI: a tiny pretraining run writes every output; --resume continues."""

import json
import math
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from densessl.cli import main

SAME_IMAGE = str(Path(__file__).parents[2] / "recipes" / "same_image.yaml")

TINY = ["--set", "train.max_steps=2", "--set", "train.batch_size=4", "--set",
        "train.num_workers=0", "--set", "data.options.num_images=8", "--set",
        "data.image_size=48", "--set", "augment.view_size=32", "--set",
        "loss.dense.queue_size=1000", "--set", "loss.global.queue_size=16", "--set",
        "model.split_bn_groups=2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    assert main(["pretrain", SAME_IMAGE, "--out", str(out), *TINY]) == 0
    return out


def test_pretrain_writes_all_outputs(run_dir, capsys):
    for name in ("encoder.pt", "encoder.json", "metrics.json", "recipe.yaml",
                 "checkpoints/last.ckpt"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 2
    assert metrics["pairs_per_s"] > 0
    assert 0.0 <= metrics["data_wait_fraction"] <= 1.0
    for key in ("loss", "loss_dense", "loss_global", "feature_std", "mean_cosine"):
        assert key in metrics["final"]
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert recipe["train"]["max_steps"] == 2 and recipe["augment"]["view_size"] == 32


def test_encoder_loads_into_torchvision(run_dir):
    model = torchvision.models.resnet18(weights=None)
    result = model.load_state_dict(torch.load(run_dir / "encoder.pt"), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []


def test_resume_continues_from_saved_step(run_dir):
    before = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=False)
    queue_key = next(k for k in before["state_dict"] if k.endswith("dense_loss.queue.keys"))
    assert main(["pretrain", SAME_IMAGE, "--out", str(run_dir), "--resume", *TINY,
                 "--set", "train.max_steps=3"]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 2 and metrics["steps"] == 3
    after = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=False)
    assert after["global_step"] == 3
    # the queue came back from the checkpoint and kept filling (ring, not reset)
    filled = next(k for k in after["state_dict"] if k.endswith("dense_loss.queue.filled"))
    assert int(after["state_dict"][filled]) > int(before["state_dict"][filled])
    assert queue_key in after["state_dict"]


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["pretrain", SAME_IMAGE, "--out", str(tmp_path), "--resume", *TINY]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "last.ckpt" in err and "Traceback" not in err


@pytest.mark.parametrize("override, expected", [
    ("model.backbon=resnet50", "model.backbon: unknown key (did you mean 'backbone'?"),
    ("train.batch_size=many", "train.batch_size"),
    ("data.source=folder", "data.path is required"),
    ("pairs.builder=nope", "pairs.builder: unknown builder 'nope'"),
    ("loss.dense.temperature=-1", "loss.dense.temperature"),
])
def test_recipe_errors_are_one_clear_line(override, expected, tmp_path, capsys):
    assert main(["pretrain", SAME_IMAGE, "--out", str(tmp_path), "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1


def test_missing_data_path_names_the_path(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["pretrain", SAME_IMAGE, "--out", str(tmp_path / "o"), "--set",
                 "data.source=folder", "--set", f"data.path={missing}", "--set",
                 "data.options={}"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_inspect_pairs_writes_png(tmp_path):
    out = tmp_path / "pairs.png"
    assert main(["inspect-pairs", SAME_IMAGE, "--out", str(out), "-n", "2"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for name in ("pretrain", "inspect-pairs", "run", "finetune", "sweep", "data", "bench",
                 "export"):
        assert name in text


def test_bf16_mixed_channels_last_run_on_cpu(tmp_path):
    """The GPU settings of issue #7 also run on a CPU: Lightning's bf16-mixed autocast and
    channels_last views, with the X-ray recipe's per-class queues and instance objective."""
    xray = str(Path(__file__).parents[2] / "recipes" / "xray_segloc.yaml")
    out = tmp_path / "bf16"
    assert main(["pretrain", xray, "--out", str(out), "--set", "train.max_steps=2",
                 "--set", "train.batch_size=4", "--set", "train.num_workers=0",
                 "--set", "train.precision=bf16-mixed", "--set", "train.channels_last=true",
                 "--set", "model.split_bn_groups=2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2
    assert all(math.isfinite(metrics["final"][k]) for k in ("loss", "loss_dense", "loss_instance"))
