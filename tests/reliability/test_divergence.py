"""A diverged run never passes as a result: NaN stops it (or skips the step, counted), no
checkpoint or encoder of a NaN state is written, and export / finetune refuse a diverged or
collapsed encoder without --force."""

from __future__ import annotations

import json
import math

import pytest
import torch

from densessl.cli import main
from densessl.errors import DensesslError
from densessl.methods import DensePretraining
from densessl.methods.guards import DivergenceError
from densessl.workflows.experiment import collapse_message
from densessl.workflows.pretraining import pretrain
from tests.reliability.helpers import SAME_IMAGE, TINY, sets

RUN = TINY + ["train.num_workers=0"]


def _all_finite(path) -> bool:
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state)
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


@pytest.fixture
def nan_at_step(monkeypatch):
    """Make the loss (and so every gradient) NaN at one step; queues and data stay clean."""
    original = DensePretraining.compute_losses

    def inject(step):
        def compute_losses(self, batch):
            total, logs = original(self, batch)
            if self._trainer is not None and self.global_step == step:
                total = total * float("nan")
                logs["loss"] = total.detach()
            return total, logs
        monkeypatch.setattr(DensePretraining, "compute_losses", compute_losses)
    return inject


def test_huge_lr_stops_with_one_line_and_writes_no_encoder(tmp_path, capsys):
    out = tmp_path / "diverged"
    code = main(["pretrain", SAME_IMAGE, "--out", str(out),
                 *sets(RUN + ["train.max_steps=4", "train.lr=1e20", "train.log_every=2"])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "training diverged" in err and len(err.splitlines()) == 1
    assert not (out / "encoder.pt").exists() and not (out / "checkpoints/last.ckpt").exists()


def test_stop_keeps_the_last_finite_checkpoint(tmp_path, nan_at_step):
    nan_at_step(2)
    out = tmp_path / "stop"
    with pytest.raises(DivergenceError, match="at step 2"):
        pretrain(SAME_IMAGE, out, overrides=RUN + ["train.max_steps=5", "train.log_every=10",
                                                   "train.checkpoint_every=1"], progress=False)
    ckpt = torch.load(out / "checkpoints/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2  # saved after steps 0 and 1, never after the bad one
    assert _all_finite(out / "checkpoints/last.ckpt") and _all_finite(out / "encoder.pt")
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2


def test_skip_step_skips_and_counts(tmp_path, nan_at_step):
    nan_at_step(1)
    out = tmp_path / "skip"
    metrics = pretrain(SAME_IMAGE, out, overrides=RUN + [
        "train.max_steps=3", "train.on_nonfinite=skip_step"], progress=False)
    assert metrics["nonfinite_steps_skipped"] == 1
    assert json.loads((out / "metrics.json").read_text())["nonfinite_steps_skipped"] == 1
    assert math.isfinite(metrics["final"]["loss"]) and _all_finite(out / "encoder.pt")


def test_skip_step_gives_up_when_every_step_is_bad(tmp_path):
    with pytest.raises(DivergenceError, match="in a row"):
        pretrain(SAME_IMAGE, tmp_path / "hopeless", overrides=RUN + [
            "train.max_steps=6", "train.lr=1e20", "train.on_nonfinite=skip_step",
            "train.log_every=3"], progress=False)


def test_collapse_message_sees_nan():
    assert collapse_message({"final": {"feature_std": float("nan"), "mean_cosine": 0.1}})
    assert collapse_message({"final": {"feature_std": 0.9, "mean_cosine": float("nan")}})
    assert collapse_message({"final": {"feature_std": 0.9, "mean_cosine": 0.1,
                                       "loss": float("nan")}})
    assert collapse_message({"final": {"feature_std": 0.9, "mean_cosine": 0.1}}) is None
    assert collapse_message({}) is None  # no monitors recorded: unknown, not collapse


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    out = tmp_path_factory.mktemp("healthy") / "run"
    pretrain(SAME_IMAGE, out, overrides=RUN + ["train.max_steps=2"], progress=False)
    return out


def _copy_run(src, dst, poison=False, final=None):
    dst.mkdir()
    state = torch.load(src / "encoder.pt")
    if poison:
        state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, dst / "encoder.pt")
    metrics = json.loads((src / "metrics.json").read_text())
    if final:
        metrics["final"].update(final)
    (dst / "metrics.json").write_text(json.dumps(metrics))
    return dst / "encoder.pt"


@pytest.mark.parametrize("case", ["nan_weights", "collapsed", "nan_monitor"])
def test_export_refuses_a_broken_encoder_without_force(healthy, tmp_path, capsys, case):
    weights = _copy_run(healthy, tmp_path / case, poison=case == "nan_weights",
                        final={"collapsed": {"feature_std": 0.0, "mean_cosine": 1.0},
                               "nan_monitor": {"feature_std": float("nan")}}.get(case))
    target = tmp_path / "out.pt"
    assert main(["export", str(weights), "--to", "torchvision", "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--force" in err and len(err.splitlines()) == 1 and not target.exists()
    assert main(["export", str(weights), "--to", "torchvision", "--out", str(target),
                 "--force"]) == 0


def test_finetune_refuses_a_nan_encoder_without_force(healthy, tmp_path):
    from densessl.workflows.experiment import finetune

    weights = _copy_run(healthy, tmp_path / "nan", poison=True)
    with pytest.raises(DensesslError, match="NaN/inf.*--force"):
        finetune(SAME_IMAGE, weights, tmp_path / "ft", overrides=["model.split_bn_groups=2"])
    assert not (tmp_path / "ft" / "results.json").exists()
