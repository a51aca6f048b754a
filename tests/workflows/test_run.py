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
from densessl.models import ResNetBackbone
from densessl.workflows.experiment import CollapseWarning, collapse_message, run

RECIPES = Path(__file__).parents[2] / "recipes"
SAME_IMAGE = str(RECIPES / "same_image.yaml")

TINY = [
    "data.image_size=32", "data.options.num_images=16", "augment.view_size=32",
    "train.max_steps=2", "train.batch_size=4", "train.num_workers=0",
    "finetune.image_size=32", "finetune.steps=2", "finetune.detection_steps=1",
    "finetune.supervised_steps=2", "finetune.batch_size=4", "finetune.seeds=[0,1]",
    "finetune.label_fractions=[0.5]", "finetune.num_threads=1",
    "finetune.options={num_train: 8, num_val: 4, num_source: 4}",
    "model.split_bn_groups=2",  # split key BN needs 2+ samples per group at batch 4
]


def assert_not_constant(scores: dict, prefix: str = "") -> None:
    """Per-class IoUs of a predictor that outputs one class everywhere are 0 but for that
    class: ask for at least two classes with IoU > 0."""
    ious = {k: v for k, v in scores.items()
            if k.startswith(prefix + "IoU_") and not k.endswith("_std")}
    assert len(ious) >= 2 and sum(v > 0 for v in ious.values()) >= 2, ious


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
    assert list(on_disk) == ["floor", "pretrained", "random", "supervised", "differences",
                             "protocol", "data"]
    tasks = {"segmentation/fpn@50%", "linear_probe@50%", "detection/faster_rcnn@50%"}
    assert on_disk["protocol"]["primary"] == "linear_probe@50%/mIoU"
    assert set(on_disk["differences"]) == {"pretrained - random", "supervised - random"}
    assert on_disk["floor"]["detection/faster_rcnn@50%"]["box_mAP"] == 0.0
    for name in ("pretrained", "random", "supervised"):
        init = on_disk[name]
        assert set(init) == tasks
        assert {"mIoU", "mIoU_std", "IoU_disc"} <= set(init["segmentation/fpn@50%"])
        assert {"box_mAP", "box_AP50", "box_AP75", "box_AR100", "box_mAP_std"} <= set(
            init["detection/faster_rcnn@50%"])
        assert init["linear_probe@50%"]["n_seeds"] == 2
        assert "fg_mIoU" in init["linear_probe@50%"]
        # the probe's predictions are not constant: a constant map has IoU > 0 for at most
        # one class, and its foreground IoU is the predict-background floor's (0)
        assert_not_constant(init["linear_probe@50%"])
        assert init["linear_probe@50%"]["fg_mIoU"] > on_disk["floor"]["linear_probe@50%"][
            "fg_mIoU"]
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
    assert set(results) == {"floor", "pretrained", "random", "differences", "protocol", "data"}
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


@pytest.mark.parametrize("final, warned", [
    ({"loss": 5.1, "feature_std": 0.8, "mean_cosine": 0.2}, False),     # healthy
    ({"loss": 5.1, "feature_std": 0.01, "mean_cosine": 0.99}, True),    # collapsed
    ({"loss": float("nan"), "feature_std": 0.8, "mean_cosine": 0.2}, True),  # diverged
])
def test_run_warns_exactly_when_pretraining_collapsed(tmp_path, monkeypatch, final, warned):
    """The pretraining's final monitors are set, so whether run must warn is known."""
    import densessl.workflows.pretraining
    from densessl.recipe import load_recipe
    from densessl.workflows.experiment import _pretrain_all

    def fake_pretrain(recipe, out, overwrite=False, validate=True):
        return {"final": final, "pairs_per_s": 1.0, "pairs": 16, "steps": 2}

    monkeypatch.setattr(densessl.workflows.pretraining, "pretrain", fake_pretrain)
    lines = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        files = _pretrain_all(load_recipe(SAME_IMAGE), tmp_path, lines.append)
    assert files == [tmp_path / "encoder.pt"]
    collapse = [r for r in record if r.category is CollapseWarning]
    assert len(collapse) == int(warned)
    assert any(line.startswith("warning: pretraining collapsed") for line in lines) == warned
    if warned:
        assert "pretraining collapsed" in str(collapse[0].message)


def test_sparse_dense_message_counts_cells_per_image():
    from densessl.models.health import sparse_dense_message

    # 150 steps of 16 pairs on one process: 8 cells in the last batch = 0.5 per image
    metrics = {"final": {"dense_pairs": 8.0}, "pairs": 2400, "steps": 150, "world_size": 1}
    assert "0.50 query cells per image" in sparse_dense_message(metrics)
    # the same cells on each of 2 processes of 8 pairs each: 1 per image, enough
    assert sparse_dense_message({**metrics, "world_size": 2}) is None
    assert sparse_dense_message({"final": {"dense_pairs": 32.0}, "pairs": 160,
                                 "steps": 10}) is None
    assert sparse_dense_message({"final": {}, "pairs": 160, "steps": 10}) is None


def test_aggregate_mean_std_and_table():
    raw = {"pretrained": {"seg@10%": [{"mIoU": 0.5}, {"mIoU": 0.7}]},
           "random": {"seg@10%": [{"mIoU": 0.2}, {"mIoU": 0.2}]}}
    res = aggregate(raw)
    assert res["pretrained"]["seg@10%"]["mIoU"] == pytest.approx(0.6)
    assert res["pretrained"]["seg@10%"]["mIoU_std"] == pytest.approx(0.1414, abs=1e-4)
    assert res["random"]["seg@10%"]["mIoU_std"] == 0
    assert "| seg@10% | mIoU | 60.0 ± 14.1 | 20.0 ± 0.0 |" in results_table(res)


SHORT = ["train.max_steps=2", "train.batch_size=4", "train.num_workers=0",
         "model.split_bn_groups=2",  # split key BN needs 2+ samples per group at batch 4
         "finetune.steps=2", "finetune.detection_steps=1", "finetune.supervised_steps=2",
         "finetune.batch_size=4", "finetune.seeds=[0]", "finetune.label_fractions=[1.0]",
         "finetune.image_size=32", "finetune.num_threads=1"]


@pytest.mark.slow
def test_xray_demo_runs_end_to_end_on_its_synthetic_set(tmp_path, monkeypatch):
    """The README's main job, shortened: SegLoc pretraining and its label-free control, the
    probe on every init next to the floor, each test subset reported apart, label use said."""
    monkeypatch.setenv("DENSESSL_CACHE", str(tmp_path / "cache"))
    results = run(str(RECIPES / "demo.yaml"), tmp_path / "out", log=lambda *a: None,
                  overrides=SHORT + ["pairs.options.synthetic_n=16",
                                     "finetune.options={synthetic_n: 16}",
                                     "finetune.seeds=[0,1]", "finetune.probe_steps=5"])
    assert list(results) == ["floor", "pretrained", "label_free", "random", "supervised",
                             "differences", "protocol", "data"]
    for init in ("floor", "pretrained", "label_free", "random", "supervised"):
        probe = results[init]["linear_probe@100%"]
        for subset in ("easy", "hard", "hidden"):
            assert 0.0 <= probe[f"{subset}/mIoU"] <= 1.0
            assert 0.0 <= probe[f"{subset}/fg_mIoU"] <= 1.0
    labels = results["protocol"]["labels"]
    assert "class ids" in labels["pretrained"] and "class ids" not in labels["label_free"]
    assert labels["random"] == "none"
    assert {"pretrained - random", "label_free - random", "supervised - random"} == set(
        results["differences"])
    control = (tmp_path / "out" / "pretrain_label_free" / "recipe.yaml").read_text()
    assert "queue: single" in control
    assert (tmp_path / "out" / "pretrain" / "encoder.pt").is_file()


def test_label_free_control_must_not_read_class_ids():
    from densessl.errors import RecipeError
    from densessl.recipe import load_recipe
    from densessl.workflows.experiment import label_free_recipe, pretraining_labels

    demo = load_recipe(str(RECIPES / "demo.yaml"))
    assert pretraining_labels(demo).endswith("class ids (per-class queues)")
    assert pretraining_labels(label_free_recipe(demo)) == \
        "segment masks (cut-paste segment bank)"
    assert pretraining_labels(load_recipe(SAME_IMAGE)) == "none"
    # refused when the recipe is read (a Recipe validator), before any run
    with pytest.raises(RecipeError, match="still reads .*class ids"):
        load_recipe(str(RECIPES / "demo.yaml"),
                    ["finetune.label_free_set={loss.dense.temperature: 0.1}"])


def test_pretrain_seeds_are_one_or_one_per_seed():
    from densessl.errors import RecipeError
    from densessl.recipe import load_recipe

    load_recipe(SAME_IMAGE, ["finetune.seeds=[0,1,2]", "finetune.pretrain_seeds=[5,6,7]"])
    with pytest.raises(RecipeError, match="pretrain_seeds: expected 1 seed or as many"):
        load_recipe(SAME_IMAGE, ["finetune.seeds=[0,1,2]", "finetune.pretrain_seeds=[5,6]"])


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


def test_pretraining_seeds_zip_with_probe_seeds(tmp_path, monkeypatch):
    """Two pretraining seeds: two encoders, the i-th probe seed on the i-th encoder. The
    recipe is validated once, at run()'s entry, not again by each pretraining and the
    fine-tuning it starts."""
    from densessl.workflows import validation

    calls = {"pretraining": 0, "finetuning": 0}
    for stage in calls:
        original = getattr(validation, f"check_{stage}")

        def counting(recipe, _original=original, _stage=stage):
            calls[_stage] += 1
            return _original(recipe)

        monkeypatch.setattr(validation, f"check_{stage}", counting)
    overrides = TINY + ["finetune.tasks=[linear_probe]", "finetune.inits=[pretrained,random]",
                        "finetune.pretrain_seeds=[3,4]", "finetune.probe_steps=3"]
    results = run(SAME_IMAGE, tmp_path, overrides=overrides, log=lambda *a: None)
    assert calls == {"pretraining": 1, "finetuning": 1}
    for seed in (3, 4):
        assert (tmp_path / "pretrain" / f"seed{seed}" / "encoder.pt").is_file()
    a, b = (torch.load(tmp_path / "pretrain" / f"seed{s}" / "encoder.pt") for s in (3, 4))
    assert not torch.equal(a["conv1.weight"], b["conv1.weight"])
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert [Path(w).parent.name for w in runs["weights"]] == ["seed3", "seed4"]
    assert results["pretrained"]["linear_probe@50%"]["n_seeds"] == 2
    diff = results["differences"]["pretrained - random"]["linear_probe@50%"]["mIoU"]
    assert diff["n"] == 2


def test_replicas_must_match_the_seeds():
    from densessl.errors import DensesslError
    from densessl.eval.finetune import group_replicas
    from densessl.models.weights import EncoderInit

    inits = [EncoderInit("pretrained", {}), EncoderInit("pretrained", {}), EncoderInit("random")]
    groups = group_replicas(inits, [0, 1])
    assert [len(g) for g in groups.values()] == [2, 1]
    with pytest.raises(DensesslError, match="2 encoders for 3 finetune.seeds"):
        group_replicas(inits, [0, 1, 2])
