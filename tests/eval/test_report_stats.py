"""results.json statistics: paired differences with a Student-t interval (checked against a
hand formula in float64 with the tabulated t quantile), the floor entry, the ceiling check and
its warning, and the table that prints them."""

from __future__ import annotations

import math

import pytest

from densessl.eval.report import aggregate, build_results, mean_std, paired_interval, results_table


def test_paired_interval_against_hand_formula():
    a, b = [0.30, 0.34, 0.29], [0.20, 0.21, 0.22]
    d = [0.10, 0.13, 0.07]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    # Student t's 97.5 % quantile at 2 degrees of freedom has a closed form:
    # t = (2p − 1) · sqrt(2 / (4 p (1 − p)))
    p = 0.975
    t975_df2 = (2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p)))
    out = paired_interval(a, b)
    assert out["n"] == 3 and out["mean"] == pytest.approx(mean, abs=1e-12)
    assert out["std"] == pytest.approx(sd, abs=1e-12)
    assert out["ci_low"] == pytest.approx(mean - t975_df2 * sd / math.sqrt(3), abs=1e-9)
    assert out["ci_high"] == pytest.approx(mean + t975_df2 * sd / math.sqrt(3), abs=1e-9)
    one = paired_interval([0.5], [0.2])
    assert one["mean"] == pytest.approx(0.3) and math.isnan(one["ci_low"])
    nan_pair = paired_interval([0.5, float("nan"), 0.4], [0.2, 0.1, 0.2])
    assert nan_pair["n"] == 2
    with pytest.raises(ValueError, match="3 values against 2"):
        paired_interval([1, 2, 3], [1, 2])


def _raw(pre, rnd, sup):
    def runs(values):
        return [{"easy/mIoU": v, "easy/fg_mIoU": v / 2, "IoU_x": 0.0} for v in values]

    return {"pretrained": {"linear_probe@100%": runs(pre)},
            "random": {"linear_probe@100%": runs(rnd)},
            "supervised": {"linear_probe@100%": runs(sup)}}


FLOOR = {"linear_probe@100%": [{"easy/mIoU": 0.08, "easy/fg_mIoU": 0.0, "IoU_x": 0.0}]}


def test_results_have_floor_differences_and_a_protocol_that_discriminates():
    raw = _raw([0.30, 0.34, 0.29], [0.20, 0.21, 0.22], [0.40, 0.41, 0.42])
    res = build_results(raw, FLOOR, {"pretrained": "class ids", "random": "none"})
    assert list(res)[:4] == ["floor", "pretrained", "random", "supervised"]
    assert res["floor"]["linear_probe@100%"]["easy/mIoU"] == 0.08
    assert res["floor"]["linear_probe@100%"]["n_seeds"] == 1
    diff = res["differences"]["pretrained - random"]["linear_probe@100%"]["easy/mIoU"]
    assert diff["mean"] == pytest.approx(0.1) and diff["n"] == 3
    assert "supervised - random" in res["differences"]
    assert "IoU_x" not in res["differences"]["pretrained - random"]["linear_probe@100%"]
    proto = res["protocol"]
    assert proto["primary"] == "linear_probe@100%/mIoU" and proto["discriminates"] is True
    assert proto["warnings"] == [] and proto["labels"]["pretrained"] == "class ids"
    table = results_table(res)
    assert "| linear_probe@100% | easy/mIoU | 8.0 ± 0.0 | 31.0 ± 2.6 | 21.0 ± 1.0 | " \
           "41.0 ± 1.0 | +10.0 [+2.5, +17.5] | +20.0 [+20.0, +20.0] |" in table
    assert "supervised (ceiling)" in table and "labels used: pretrained: class ids" in table
    assert "cannot discriminate" not in table


def test_ceiling_under_twice_the_floor_warns():
    raw = _raw([0.10, 0.11], [0.09, 0.10], [0.12, 0.15])
    res = build_results(raw, FLOOR)
    assert res["protocol"]["discriminates"] is False
    (warning,) = res["protocol"]["warnings"]
    assert "ceiling (supervised, 13.5) is under 2 × the floor (8.0)" in warning
    assert "cannot discriminate at this budget" in results_table(res)


def test_unequal_seed_counts_are_an_error():
    raw = _raw([0.3, 0.3, 0.3], [0.2, 0.2], [0.4, 0.4, 0.4])
    with pytest.raises(ValueError, match="3 seeds against 2"):
        build_results(raw, FLOOR)


def test_mean_std_leaves_nan_out_and_is_a_sample_std():
    # by hand: mean of 0.2, 0.4, 0.9 is 0.5; squared deviations 0.09 + 0.01 + 0.16 over n − 1
    assert mean_std([0.2, float("nan"), 0.4, 0.9]) == pytest.approx((0.5, math.sqrt(0.13)))
    assert mean_std([0.7]) == (0.7, 0.0)
    mean, std = mean_std([float("nan")])
    assert math.isnan(mean) and std == 0.0
    cell = aggregate({"random": {"seg": [{"mIoU": 0.2}, {"mIoU": 0.4}, {"mIoU": 0.9}]}})
    assert cell["random"]["seg"] == pytest.approx({"mIoU": 0.5, "mIoU_std": math.sqrt(0.13),
                                                   "n_seeds": 3})


def test_detection_ceiling_under_the_ap50_bar_warns_per_split():
    """Detection's floor is 0 AP: the supervised detector must reach AP50 0.3 on each split,
    else the table says detection cannot discriminate; the probe's verdict is separate."""
    raw = _raw([0.30, 0.34], [0.20, 0.21], [0.40, 0.41])
    det = "detection/faster_rcnn@100%"
    for init, ap50 in (("pretrained", 0.1), ("random", 0.05), ("supervised", None)):
        raw[init][det] = [{"easy/box_AP50": ap50 if ap50 is not None else v,
                           "hard/box_AP50": ap50 if ap50 is not None else 0.45,
                           "easy/box_mAP": 0.1, "hard/box_mAP": 0.1} for v in (0.25, 0.29)]
    res = build_results(raw, FLOOR)
    proto = res["protocol"]
    assert proto["discriminates"] is True  # the primary (probe) is fine
    assert proto["tasks"] == {"linear_probe@100%": True, det: False}
    (warning,) = proto["warnings"]  # easy misses the bar (27.0), hard clears it (45.0)
    assert f"{det} easy/box_AP50" in warning and "under AP50 30" in warning
    raw["supervised"][det] = [{"easy/box_AP50": 0.5, "hard/box_AP50": 0.5, "easy/box_mAP": 0.2,
                               "hard/box_mAP": 0.2}] * 2
    assert build_results(raw, FLOOR)["protocol"]["tasks"][det] is True


def test_detection_only_protocol_names_ap50_and_its_bar():
    det = "detection/faster_rcnn@100%"
    raw = {init: {det: [{"easy/box_AP50": v, "easy/box_mAP": v / 2}] * 2}
           for init, v in (("pretrained", 0.4), ("random", 0.35), ("supervised", 0.5))}
    res = build_results(raw, {det: [{"easy/box_AP50": 0.0, "easy/box_mAP": 0.0}]})
    assert res["protocol"]["primary"] == f"{det}/box_AP50"
    assert res["protocol"]["discriminates"] is True
    assert "ceiling AP50 ≥ 30 on every split" in results_table(res)
