"""Nothing written is lost or half-written: refused resumes change nothing, finished results
are not overwritten without --overwrite, export never eats its input, unwritable paths are one
line before any work, files get umask permissions, sweeps do not mix numerics."""

from __future__ import annotations

import json
import os
import stat

import pytest

from densessl.cli import main
from densessl.errors import DensesslError
from densessl.sweep import run_sweep
from densessl.workflows.pretraining import pretrain
from tests.reliability.helpers import SAME_IMAGE, TINY, sets

RUN = TINY + ["train.num_workers=0", "train.max_steps=2"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    pretrain(SAME_IMAGE, out, overrides=RUN, progress=False)
    return out


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    return err


@pytest.mark.parametrize("changes, named", [
    (["loss.dense.temperature=0.5"], ["loss.dense.temperature"]),
    (["model.dense_dim=32", "model.backbone=resnet34"], ["model.dense_dim", "model.backbone"]),
    (["loss.dense.queue_size=500"], ["loss.dense.queue_size"]),
    (["seed=1"], ["seed"]),
])
def test_resume_with_changed_settings_is_refused_and_changes_nothing(finished, capsys,
                                                                     changes, named):
    before = _snapshot(finished)
    code = main(["pretrain", SAME_IMAGE, "--out", str(finished), "--resume",
                 *sets(RUN + ["train.max_steps=4"] + changes)])
    err = _one_line(capsys)
    assert code == 2 and all(k in err for k in named)
    assert _snapshot(finished) == before  # recipe.yaml, metrics.json, checkpoint untouched


def test_resume_may_change_budget_and_logging_keys(finished):
    from densessl.recipe import load_recipe
    from densessl.workflows.resume import prepare_out

    recipe = load_recipe(SAME_IMAGE, RUN + ["train.max_steps=9", "train.log_every=3",
                                            "train.checkpoint_every=5", "train.num_workers=2",
                                            "finetune.steps=7"])
    state = prepare_out(recipe, finished, resume=True, overwrite=False)
    assert state.step == 2 and not state.nothing_to_do


def test_pretrain_into_a_finished_run_needs_overwrite(finished, capsys):
    before = _snapshot(finished)
    assert main(["pretrain", SAME_IMAGE, "--out", str(finished), *sets(RUN)]) == 2
    err = _one_line(capsys)
    assert "--overwrite" in err and "--resume" in err
    assert _snapshot(finished) == before


def test_run_into_existing_results_needs_overwrite(tmp_path, capsys):
    (tmp_path / "results.json").write_text("{}")
    assert main(["run", SAME_IMAGE, "--out", str(tmp_path), *sets(RUN)]) == 2
    assert "--overwrite" in _one_line(capsys)


def test_export_safety(finished, tmp_path, capsys):
    weights = finished / "encoder.pt"
    original = weights.read_bytes()
    # its own input
    assert main(["export", str(weights), "--to", "torchvision", "--out", str(weights)]) == 2
    assert "input" in _one_line(capsys) and weights.read_bytes() == original
    # a folder: the file goes inside it
    folder = tmp_path / "exports"
    folder.mkdir()
    assert main(["export", str(weights), "--to", "timm", "--out", str(folder)]) == 0
    written = folder / "encoder.timm.pt"
    assert written.is_file() and (folder / "encoder.timm.pt.card.json").is_file()
    capsys.readouterr()
    # an existing file
    assert main(["export", str(weights), "--to", "timm", "--out", str(written)]) == 2
    assert "--overwrite" in _one_line(capsys)
    assert main(["export", str(weights), "--to", "timm", "--out", str(written),
                 "--overwrite"]) == 0


def test_written_files_follow_the_umask(finished):
    mask = os.umask(0o022)
    os.umask(mask)
    expected = 0o666 & ~mask
    for name in ("encoder.pt", "encoder.json", "metrics.json", "recipe.yaml",
                 "checkpoints/last.ckpt"):
        assert stat.S_IMODE((finished / name).stat().st_mode) == expected, name


def test_unwritable_output_is_one_line_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for argv in (["pretrain", SAME_IMAGE, "--out", str(blocker / "out"), *sets(RUN)],
                 ["run", SAME_IMAGE, "--out", str(blocker / "out"), *sets(RUN)]):
        assert main(argv) == 2
        assert "cannot write" in _one_line(capsys)


def _fake_cell(recipe, cell_dir):
    return {"metric": 1.0}


def test_sweep_refuses_to_mix_jobs_settings(tmp_path, monkeypatch):
    import densessl.sweep.runner as sweep

    spec = {"base": SAME_IMAGE, "set": {"model.split_bn_groups": 2},
            "grid": {"seed": [0, 1]}, "report": {"x": None, "over": ["seed"]}}
    monkeypatch.setattr(sweep.os, "cpu_count", lambda: 4)
    run_sweep(spec, tmp_path, jobs=1, cell_fn=_fake_cell, log=lambda *a: None)
    assert json.loads((tmp_path / "numerics.json").read_text())["jobs"] == 1
    with pytest.raises(DensesslError, match="--jobs 1"):
        run_sweep(spec, tmp_path, jobs=2, cell_fn=_fake_cell, log=lambda *a: None)
    run_sweep(spec, tmp_path, jobs=1, cell_fn=_fake_cell, log=lambda *a: None)  # same: fine


def test_view_larger_than_source_is_refused_before_work(tmp_path, capsys):
    assert main(["pretrain", SAME_IMAGE, "--out", str(tmp_path / "o"),
                 *sets(RUN + ["augment.view_size=64", "data.image_size=48"])]) == 2
    err = _one_line(capsys)
    assert "augment.view_size 64" in err and "data.image_size 48" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("override, expected", [
    ("data.options.num_images=0", "data.options: cannot build SyntheticScenes"),
    ("train.checkpoint_every=-1", "train.checkpoint_every"),
    ("train.on_nonfinite=ignore", "train.on_nonfinite"),
    ("model.split_bn_groups=4", "model.split_bn_groups"),
])
def test_bad_recipe_values_are_one_line(tmp_path, capsys, override, expected):
    assert main(["pretrain", SAME_IMAGE, "--out", str(tmp_path / "o"),
                 *sets(RUN + [override])]) == 2
    assert expected in _one_line(capsys)


def test_corrupt_checkpoint_on_resume_is_one_line(finished, tmp_path, capsys):
    out = tmp_path / "corrupt"
    (out / "checkpoints").mkdir(parents=True)
    data = (finished / "checkpoints/last.ckpt").read_bytes()
    (out / "checkpoints/last.ckpt").write_bytes(data[: len(data) // 2])  # truncated
    assert main(["pretrain", SAME_IMAGE, "--out", str(out), "--resume", *sets(RUN)]) == 2
    assert "not a readable checkpoint" in _one_line(capsys)
