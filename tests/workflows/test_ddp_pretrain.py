"""Lightning DDP on 2 CPU processes (gloo) through the real command: one set of outputs,
pairs counted over both processes, the queue identical on every rank."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SAME_IMAGE = str(Path(__file__).parents[2] / "recipes" / "same_image.yaml")


@pytest.mark.slow
def test_ddp_pretrain_on_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "densessl", "pretrain", SAME_IMAGE, "--out", str(out),
           "--set", "train.devices=2", "--set", "train.strategy=ddp",
           "--set", "train.accelerator=cpu", "--set", "train.max_steps=2",
           "--set", "train.batch_size=4", "--set", "train.num_workers=0",
           "--set", "data.options.num_images=16", "--set", "data.image_size=48",
           "--set", "augment.view_size=32", "--set", "model.key_bn=shuffle"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("outputs in") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["pairs"] == 2 * 2 * 4
    state = torch.load(out / "checkpoints/last.ckpt", weights_only=False)["state_dict"]
    filled = next(v for k, v in state.items() if k.endswith("dense_loss.queue.filled"))
    # at most 16 valid key cells per image are enqueued: one process alone could add at most
    # 2 steps × 4 images × 16 = 128, so more means both processes' keys were gathered
    assert 2 * 4 * 16 < int(filled) <= 2 * 2 * 4 * 16
