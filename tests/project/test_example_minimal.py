"""examples/minimal_pretrain.py runs at tiny sizes: finite losses, and the momentum encoder
follows the online one by an exact EMA."""

import importlib.util
import math
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "minimal_pretrain.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("minimal_pretrain", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _param(model, branch: str) -> torch.Tensor:
    # the dense head's first conv: it gets a gradient on every step
    module = getattr(model, branch)
    return next(p for name, p in module.named_parameters() if name.startswith("dense_head"))


def test_minimal_pretrain_runs_and_updates_momentum_by_ema(capsys):
    example = _load_example()
    seen = []  # per step: (m, momentum before its update, online) in float64

    def on_step(step, loss, m, model):
        momentum_now = _param(model, "momentum").detach().double().clone()
        if seen:  # the previous step's update: momentum ← m·momentum + (1 − m)·online
            m_prev, momentum_prev, online_prev = seen[-1]
            expected = m_prev * momentum_prev + (1 - m_prev) * online_prev
            torch.testing.assert_close(momentum_now, expected, rtol=0, atol=1e-6)
            if m_prev < 1:
                assert not torch.equal(momentum_now, momentum_prev)
        seen.append((m, momentum_now, _param(model, "online").detach().double().clone()))

    result = example.main(steps=3, batch_size=2, image_size=32, view_size=32, lr=0.1,
                          momentum=0.9, on_step=on_step)
    assert len(result["losses"]) == 3 and len(seen) == 3
    assert all(math.isfinite(loss) for loss in result["losses"])
    assert seen[0][0] < 1  # the first update really averaged
    # online and momentum differ after training; the online weights moved
    model = result["model"]
    assert not torch.equal(_param(model, "online"), _param(model, "momentum"))
    assert "loss" in capsys.readouterr().out


def test_minimal_pretrain_cli_flags():
    example = _load_example()
    result = example.cli(["--steps", "2", "--batch-size", "2", "--image-size", "32",
                          "--view-size", "32", "--device", "cpu"])
    assert len(result["losses"]) == 2
    assert all(math.isfinite(loss) for loss in result["losses"])
