"""The report's primary metric (finetune.primary, validated at recipe load), a verdict per label
fraction, the unit the intervals cover (pretraining runs or probe seeds) and the plots.
Intervals are checked against scipy.stats.t.interval on the raw per-seed values; the plots by
their matplotlib objects (panels, error bar ends)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from densessl.errors import RecipeError
from densessl.eval.report import (
    build_results,
    interval_unit,
    label_efficiency_figure,
    results_figure,
    results_table,
    t_half_width,
    write_report,
)
from densessl.recipe import load_recipe

SAME_IMAGE = str(Path(__file__).parents[2] / "recipes" / "same_image.yaml")
PROBE10, PROBE100 = "linear_probe@10%", "linear_probe@100%"


def _runs(values, split=""):
    prefix = f"{split}/" if split else ""
    return [{f"{prefix}mIoU": v, f"{prefix}fg_mIoU": v / 2} for v in values]


def _fractions_raw():
    """The 10 % probe's ceiling (0.15) is under 2 × its floor (0.1); the 100 % one's is not."""
    return {"pretrained": {PROBE10: _runs([0.12, 0.13, 0.11]), PROBE100: _runs([0.4, 0.45, 0.5])},
            "random": {PROBE10: _runs([0.10, 0.11, 0.12]), PROBE100: _runs([0.3, 0.28, 0.33])},
            "supervised": {PROBE10: _runs([0.15, 0.15, 0.15]),
                           PROBE100: _runs([0.6, 0.62, 0.61])}}


FLOOR = {PROBE10: _runs([0.1]), PROBE100: _runs([0.1])}


def test_primary_defaults_to_100_percent_and_each_fraction_has_its_verdict():
    res = build_results(_fractions_raw(), FLOOR)
    proto = res["protocol"]
    # the first listed fraction (10 %) cannot discriminate; the primary is the 100 % probe
    assert proto["primary"] == f"{PROBE100}/mIoU" and proto["discriminates"] is True
    assert proto["tasks"] == {PROBE10: False, PROBE100: True}
    (warning,) = proto["warnings"]
    assert warning.startswith(f"warning: {PROBE10} mIoU: the ceiling (supervised, 15.0)")
    table = results_table(res)
    assert f"{PROBE10}: cannot discriminate; {PROBE100} (primary): discriminates" in table
    assert f"primary metric: {PROBE100}/mIoU (ceiling ≥ 2 × floor" in table
    # named by the recipe: the 10 % probe is judged, and fails
    named = build_results(_fractions_raw(), FLOOR, primary="linear_probe@10%/fg_mIoU")
    assert named["protocol"]["primary"] == f"{PROBE10}/fg_mIoU"
    assert named["protocol"]["discriminates"] is False
    assert build_results(_fractions_raw(), FLOOR, primary="linear_probe")["protocol"][
        "primary"] == f"{PROBE100}/mIoU"


def test_recipe_validates_finetune_primary():
    base = ["finetune.tasks=[segmentation,linear_probe,detection]",
            "finetune.label_fractions=[0.1,1.0]"]
    for spec in ("linear_probe/mIoU", "segmentation/fpn@10%/mIoU", "segmentation/fg_mIoU",
                 "detection/faster_rcnn/box_AP50", "detection@10%/box_mAP"):
        assert load_recipe(SAME_IMAGE, base + [f"finetune.primary={spec}"]).finetune.primary \
            == spec
    bad = {"segmentation/unet/mIoU": "no task 'segmentation/unet'",
           "linear_probe/box_AP50": "linear_probe has no metric 'box_AP50'",
           "linear_probe@50%": "linear_probe is not run at 50%",
           "detection/mask_mAP": "detection/faster_rcnn has no metric 'mask_mAP'"}
    for spec, why in bad.items():
        with pytest.raises(RecipeError) as err:
            load_recipe(SAME_IMAGE, base + [f"finetune.primary={spec}"])
        message = str(err.value)
        assert f"finetune.primary '{spec}': {why}" in message
        assert "valid: segmentation/fpn, linear_probe, detection/faster_rcnn" in message
        assert "@<fraction> of 10%, 100%" in message


def test_task_keys_match_the_runs():
    from densessl.eval.finetune import task_runs

    recipe = load_recipe(SAME_IMAGE, ["finetune.tasks=[segmentation,linear_probe,detection]",
                                      "finetune.segmentation_archs=[fpn,unet]",
                                      "finetune.label_fractions=[0.01,0.5,1.0]"])
    assert recipe.finetune.task_keys() == [key for *_, key in task_runs(recipe)]


def test_pretrain_seeds_broadcast_one_probe_seed():
    cfg = load_recipe(SAME_IMAGE, ["finetune.seeds=[0]",
                                   "finetune.pretrain_seeds=[1,2,3]"]).finetune
    assert cfg.pretrain_seeds == [1, 2, 3] and cfg.seeds == [0]
    with pytest.raises(RecipeError, match="pretrain_seeds: expected 1 seed or as many"):
        load_recipe(SAME_IMAGE, ["finetune.seeds=[0,1]", "finetune.pretrain_seeds=[1,2,3]"])


def test_intervals_are_student_t_over_the_unit_and_the_table_names_it():
    pre, rnd = [0.40, 0.46, 0.43, 0.51, 0.38], [0.30, 0.31, 0.35, 0.29, 0.33]
    raw = {"pretrained": {PROBE100: _runs(pre)}, "random": {PROBE100: _runs(rnd)}}
    unit = interval_unit(5, [0, 1, 2, 3, 4])
    assert unit == "pretraining runs (n=5, each with its own probe / fine-tuning seed)"
    res = build_results(raw, unit=unit)
    assert res["protocol"]["unit"] == unit
    assert f"- ± std and 95 % CI over {unit}" in results_table(res)
    # paired difference against scipy on the differences computed here
    d = np.subtract(pre, rnd)
    low, high = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    diff = res["differences"]["pretrained - random"][PROBE100]["mIoU"]
    assert (diff["ci_low"], diff["ci_high"]) == pytest.approx((low, high), abs=1e-12)
    # an init's own interval from its mean, std and n
    cell = res["pretrained"][PROBE100]
    low, high = stats.t.interval(0.95, 4, loc=np.mean(pre), scale=stats.sem(pre))
    assert t_half_width(cell["mIoU_std"], cell["n_seeds"]) == pytest.approx((high - low) / 2)
    assert math.isnan(t_half_width(0.1, 1))
    # default: the seeds of one pretraining run; broadcast: one probe seed for every run
    assert build_results(raw)["protocol"]["unit"] == \
        "probe / fine-tuning seeds of one pretraining run (n=5)"
    assert interval_unit(3, [7, 7, 7]) == \
        "pretraining runs (n=3, probe / fine-tuning seed 7 for each)"


def _split_raw(splits, fractions=(PROBE100,)):
    rng = np.random.default_rng(0)
    return {init: {task: [{f"{s}/mIoU" if s else "mIoU": float(base + rng.normal(0, 0.02))
                           for s in splits} for _ in range(3)]
                   for task in fractions + ("segmentation/fpn@100%",)}
            for init, base in (("pretrained", 0.4), ("random", 0.3), ("supervised", 0.7))}


def test_results_figure_has_a_panel_per_split_and_t_interval_bars():
    splits = ("easy", "hard", "hidden", "other")
    raw = _split_raw(splits)
    floor = {t: [{f"{s}/mIoU": 0.1 for s in splits}] for t in raw["random"]}
    res = build_results(raw, floor)
    fig = results_figure(res)
    assert [ax.get_title() for ax in fig.axes] == list(splits)
    rows = {round(ax.get_position().y0, 3) for ax in fig.axes}
    assert len(rows) == 2  # at most three panels a row
    hard = fig.axes[1]
    assert len(hard.get_xticks()) == 2  # one group per task
    # floor (dotted) and ceiling (dashed): one line segment each per group, at their values
    lines = [c for c in hard.collections if c.get_linestyle()[0][1] is not None]
    ends = sorted(round(y, 6) for c in lines for s in c.get_segments() for y in s[:, 1])
    ceiling = [100 * res["supervised"][t]["hard/mIoU"] for t in (PROBE100, "segmentation/fpn@100%")]
    assert ends == pytest.approx(sorted([10.0] * 4 + [y for y in ceiling for _ in (0, 1)]))
    # the pretrained init's error bar on the probe spans scipy's t interval (in %)
    values = [r["hard/mIoU"] for r in raw["pretrained"][PROBE100]]
    low, high = stats.t.interval(0.95, 2, loc=np.mean(values), scale=stats.sem(values))
    bar = hard.containers[0]  # pretrained is the first plotted init
    (segment,) = [s for s in bar.lines[2][0].get_segments() if s[0][0] < 0.5]
    assert segment[:, 1] == pytest.approx([100 * low, 100 * high])
    # without split prefixes: one panel
    plain = build_results(_split_raw(("",)))
    assert len(results_figure(plain).axes) == 1


def test_write_report_adds_a_label_efficiency_figure_with_several_fractions(tmp_path):
    splits = ("easy", "hard")
    res = build_results(_split_raw(splits, (PROBE10, PROBE100)))
    assert label_efficiency_figure(res) is not None
    assert [ax.get_title() for ax in label_efficiency_figure(res).axes] == [
        "linear_probe — easy", "linear_probe — hard"]
    write_report(res, tmp_path)
    for name in ("results.png", "label_efficiency.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "results.json").read_text())["protocol"]["unit"]
    # one fraction: no curve, and a stale one is removed
    write_report(build_results(_split_raw(splits)), tmp_path)
    assert not (tmp_path / "label_efficiency.png").exists()


def test_finetune_broadcasts_one_probe_seed_over_pretraining_runs(tmp_path, one_thread):
    from densessl.models import ResNetBackbone
    from densessl.workflows.experiment import finetune

    files = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        files.append(tmp_path / f"encoder{seed}.pt")
        torch.save(ResNetBackbone("resnet18").state_dict(), files[-1])
    overrides = ["finetune.image_size=32", "finetune.tasks=[linear_probe]",
                 "finetune.inits=[pretrained,random]", "finetune.seeds=[3]",
                 "finetune.probe_steps=3", "finetune.label_fractions=[0.5]",
                 "finetune.num_threads=1", "finetune.primary=linear_probe/mIoU",
                 "finetune.options={num_train: 8, num_val: 4, num_source: 4}"]
    results = finetune(SAME_IMAGE, files, tmp_path / "out", overrides, log=lambda *a: None)
    assert results["protocol"]["unit"] == \
        "pretraining runs (n=2, probe / fine-tuning seed 3 for each)"
    assert results["pretrained"]["linear_probe@50%"]["n_seeds"] == 2
    assert results["differences"]["pretrained - random"]["linear_probe@50%"]["mIoU"]["n"] == 2
    assert "over pretraining runs (n=2" in (tmp_path / "out" / "results.md").read_text()
