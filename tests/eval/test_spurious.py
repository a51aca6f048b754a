"""finetune.spurious: the artifact is stamped exactly on train images that contain the class and
on evaluation images that do not (checked against the unwrapped data), and the finetune
workflow runs with it."""

from __future__ import annotations

import json

import pytest
import torch

from densessl.data.labeled.build import build_eval_dataset
from densessl.errors import RecipeError
from densessl.eval.spurious import spurious_data
from densessl.recipe import load_recipe
from densessl.workflows.experiment import finetune


def _data(size=48):
    return build_eval_dataset("synthetic", {"num_train": 16, "num_val": 12, "num_source": 0},
                              image_size=size)


def _cfg(**kw):
    return load_recipe({"finetune": {"spurious": {"artifact": "logo", "class_id": 2, **kw}}}
                       ).finetune.spurious


def test_stamped_exactly_with_the_class_in_train_and_without_it_in_test():
    data = _data()
    wrapped = spurious_data(data, _cfg(), seed=0)
    for split, stamped_split, with_class in ((data.train, wrapped.train, True),
                                             (data.val, wrapped.val, False)):
        counts = {True: 0, False: 0}
        for i in range(len(split)):
            clean, new = split[i], stamped_split[i]
            has = bool((clean["mask"] == 2).any())
            changed = not torch.equal(clean["image"], new["image"])
            assert changed == (has == with_class), (i, has, with_class)
            assert torch.equal(clean["mask"], new["mask"])  # the artifact is not an object
            assert torch.equal(new["image"], stamped_split[i]["image"])  # same stamp each time
            counts[changed] += 1
        assert counts[True] > 0 and counts[False] > 0  # both cases exercised
    half = spurious_data(data, _cfg(rate=0.5), seed=0)
    eligible = [i for i in range(len(data.train)) if (data.train[i]["mask"] == 2).any()]
    stamped = sum(not torch.equal(data.train[i]["image"], half.train[i]["image"])
                  for i in eligible)
    assert 0 < stamped < len(eligible)


def test_bad_settings_name_the_key():
    with pytest.raises(RecipeError, match=r"finetune\.spurious\.class_id.*1\.\.4"):
        spurious_data(_data(), _cfg(class_id=9), seed=0)
    with pytest.raises(RecipeError, match=r"finetune\.spurious\.artifact.*'watermark'"):
        spurious_data(_data(), _cfg(artifact="watermark"), seed=0)
    with pytest.raises(RecipeError, match=r"finetune\.spurious\.rate"):
        _cfg(rate=0)


def test_finetune_runs_with_a_spurious_correlation(tmp_path):
    recipe = {"finetune": {"dataset": "synthetic", "image_size": 48, "inits": ["random"],
                           "tasks": ["linear_probe"], "seeds": [0], "probe_steps": 20,
                           "options": {"num_train": 12, "num_val": 8, "num_source": 0},
                           "spurious": {"artifact": "text", "class_id": 1}}}
    finetune(recipe, None, tmp_path, log=lambda *a: None)
    assert "spurious: text on train images with class" in (tmp_path / "results.md").read_text()
    assert "random" in json.loads((tmp_path / "results.json").read_text())
