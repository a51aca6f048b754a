"""``densessl run`` / ``finetune`` end to end on a tiny recipe: results files, table, plot,
collapse warning, and one-line errors for bad input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from densessl.cli import main
from densessl.eval.report import aggregate, results_table
from densessl.experiment import CollapseWarning, collapse_message, run
from densessl.models import ResNetBackbone

RECIPES = Path(__file__).parents[1] / "recipes"
SAME_IMAGE = str(RECIPES / "same_image.yaml")

TINY = [
    "data.image_size=32", "data.options.num_images=16", "augment.view_size=32",
    "train.max_steps=2", "train.batch_size=4", "train.num_workers=0",
    "finetune.image_size=32", "finetune.steps=2", "finetune.detection_steps=1",
    "finetune.supervised_steps=2", "finetune.batch_size=4", "finetune.seeds=[0,1]",
    "finetune.label_fractions=[0.5]", "finetune.num_threads=1",
    "finetune.options={num_train: 8, num_val: 4, num_source: 4}",
]


@pytest.mark.slow
def test_run_end_to_end(tmp_path, capsys):
    overrides = TINY + ["finetune.tasks=[segmentation,linear_probe,detection]",
                        "finetune.inits=[pretrained,random,supervised]"]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        results = run(SAME_IMAGE, tmp_path, overrides=overrides, log=print)
    # A 2-step pretraining may or may not trip the monitor; if it does, run says so in both.
    collapsed = collapse_message(json.loads((tmp_path / "pretrain" / "metrics.json").read_text()))
    assert any(r.category is CollapseWarning for r in record) == (collapsed is not None)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert list(on_disk) == ["pretrained", "random", "supervised"]
    tasks = {"segmentation/fpn@50%", "linear_probe@50%", "detection/faster_rcnn@50%"}
    for init in on_disk.values():
        assert set(init) == tasks
        assert {"mIoU", "mIoU_std", "IoU_disc"} <= set(init["segmentation/fpn@50%"])
        assert {"box_mAP", "box_AP50", "box_AP75", "box_AR100", "box_mAP_std"} <= set(
            init["detection/faster_rcnn@50%"])
        assert init["linear_probe@50%"]["n_seeds"] == 2
    table = (tmp_path / "results.md").read_text()
    assert "| segmentation/fpn@50% | mIoU |" in table and "supervised" in table
    assert table.splitlines()[-1] in capsys.readouterr().out  # printed too
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "pretrain" / "neck.pt").is_file()
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert len(runs["runs"]["random"]["linear_probe@50%"]) == 2


def test_cli_finetune_and_bad_input(tmp_path, capsys):
    torch.manual_seed(0)
    weights = tmp_path / "encoder.pt"
    torch.save(ResNetBackbone("resnet18").state_dict(), weights)
    base = ["finetune", SAME_IMAGE, "--out", str(tmp_path / "o")]
    for s in TINY + ["finetune.tasks=[linear_probe]", "finetune.inits=[pretrained,random]",
                     "finetune.seeds=[0]"]:
        base += ["--set", s]
    assert main(base + ["--weights", str(weights)]) == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert set(results) == {"pretrained", "random"}
    assert 0 <= results["pretrained"]["linear_probe@50%"]["mIoU"] <= 1

    torch.save(ResNetBackbone("resnet18", 4).state_dict(), tmp_path / "four.pt")
    torch.save(ResNetBackbone("resnet50").state_dict(), tmp_path / "r50.pt")
    w = ["--weights", str(weights)]
    bad = {
        "4 input channels": ["--weights", str(tmp_path / "four.pt")],
        "look like resnet50": ["--weights", str(tmp_path / "r50.pt")],
        "'val' split is empty": w + ["--set", "finetune.options.num_val=0"],
        "unknown labeled dataset": w + ["--set", "finetune.dataset=nope"],
        "no weights were given": [],
    }
    for i, (message, extra) in enumerate(bad.items()):
        out = tmp_path / f"bad{i}"
        args = base + extra
        args[args.index("--out") + 1] = str(out)
        assert main(args) == 2, message
        err = capsys.readouterr().err
        assert message in err and err.startswith("error: ") and err.count("\n") == 1, err
        assert not (out / "results.json").exists()


def test_collapse_message_thresholds():
    assert collapse_message({"final": {"feature_std": 0.8, "mean_cosine": 0.2}}) is None
    msg = collapse_message({"final": {"feature_std": 0.01, "mean_cosine": 0.99}})
    assert "feature_std 0.010 < 0.1" in msg and "mean_cosine 0.990 > 0.95" in msg


def test_aggregate_mean_std_and_table():
    raw = {"pretrained": {"seg@10%": [{"mIoU": 0.5}, {"mIoU": 0.7}]},
           "random": {"seg@10%": [{"mIoU": 0.2}, {"mIoU": 0.2}]}}
    res = aggregate(raw)
    assert res["pretrained"]["seg@10%"]["mIoU"] == pytest.approx(0.6)
    assert res["pretrained"]["seg@10%"]["mIoU_std"] == pytest.approx(0.1414, abs=1e-4)
    assert res["random"]["seg@10%"]["mIoU_std"] == 0
    assert "| seg@10% | mIoU | 60.0 ± 14.1 | 20.0 ± 0.0 |" in results_table(res)


SHORT = ["train.max_steps=2", "train.batch_size=4", "train.num_workers=0",
         "finetune.steps=2", "finetune.detection_steps=1", "finetune.supervised_steps=2",
         "finetune.batch_size=4", "finetune.seeds=[0]", "finetune.label_fractions=[1.0]",
         "finetune.image_size=32", "finetune.num_threads=1"]


@pytest.mark.slow
def test_xray_demo_runs_end_to_end_on_its_synthetic_set(tmp_path, monkeypatch):
    """The README's main job, shortened: SegLoc pretraining, PIDray segmentation + detection,
    every init, each test subset reported apart."""
    monkeypatch.setenv("DENSESSL_CACHE", str(tmp_path / "cache"))
    results = run(str(RECIPES / "demo.yaml"), tmp_path / "out", log=lambda *a: None,
                  overrides=SHORT + ["pairs.options.synthetic_n=16",
                                     "finetune.options={synthetic_n: 16}"])
    assert list(results) == ["pretrained", "random", "supervised"]
    seg = results["pretrained"]["segmentation/fpn@100%"]
    det = results["pretrained"]["detection/faster_rcnn@100%"]
    for subset in ("easy", "hard", "hidden"):
        assert 0.0 <= seg[f"{subset}/mIoU"] <= 1.0
        assert 0.0 <= det[f"{subset}/box_mAP"] <= 1.0


@pytest.mark.slow
def test_xbd_recipe_runs_end_to_end_with_the_xview2_score(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSESSL_CACHE", str(tmp_path / "cache"))
    results = run(str(RECIPES / "xbd_temporal.yaml"), tmp_path / "out", log=lambda *a: None,
                  overrides=SHORT + ["finetune.tasks=[segmentation]",
                                     "finetune.inits=[pretrained,random]"])
    scores = results["pretrained"]["segmentation/fpn@100%"]
    assert {"mIoU", "IoU_destroyed", "xview2_score", "xview2_localization_f1",
            "xview2_damage_f1"} <= scores.keys()
    assert 0.0 <= scores["xview2_score"] <= 1.0
