"""End to end: the X-ray SegLoc recipe pretrains for two steps on the synthetic X-ray set."""

import json

import torch
from helpers import small_xray_pretrain_args

from densessl import cli


def test_segloc_recipe_two_steps(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(small_xray_pretrain_args(out, tmp_path / "cache", "train.max_steps=2",
                                             "train.batch_size=8"))
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    final = metrics["final"]
    assert metrics["steps"] == 2
    for key in ("loss_dense", "loss_instance", "loss"):
        assert torch.isfinite(torch.tensor(final[key])), key
    assert final["instance_boxes"] > 0 and final["dense_queue_filled"] > 0
    assert {c["name"] for c in metrics["datasets"]} == {"PIDray", "SIXray"}
    assert metrics["skipped_samples"] == 0
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=False)["state_dict"]
    assert any(k.startswith("dense_loss.queue.keys") for k in state)
    assert any("instance_head" in k for k in state)
    assert (out / "encoder.pt").is_file()
