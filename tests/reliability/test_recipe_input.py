"""Every bad recipe input is one clear line (issue #27): malformed YAML in ``--set``, in a
recipe, in the base it inherits and in a sweep file; empty or non-mapping recipe files; names
no registry holds (pair builder, data source, labeled dataset, backbone, their options). Each
case runs the real CLI (``densessl.cli.main``) and expects exit 2, exactly one ``error:`` line
naming the key or the file, no traceback, nothing printed on stdout and no output folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from densessl.cli import main
from tests.reliability.helpers import ROOT, SAME_IMAGE, TINY, sets

DEMO = str(ROOT / "recipes" / "demo.yaml")
# a one-step run of the tiny same-image recipe: cheap even where the check comes too late
ONE_STEP = [*TINY, "train.max_steps=1", "train.num_workers=0", "finetune.seeds=[0]",
            "finetune.inits=[pretrained,random]", "finetune.dataset=synthetic"]


def one_error(capsys, argv: list[str], *names: str) -> str:
    """Run ``densessl ARGV``: exit 2, one ``error:`` line on stderr holding every one of
    ``names``, no traceback, nothing on stdout. Returns the line."""
    code = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert code == 2, (code, captured.err)
    assert len(lines) == 1, captured.err
    assert captured.err.strip().splitlines() == lines, captured.err  # one line, nothing else
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert captured.out == "", captured.out
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# --- malformed YAML -------------------------------------------------------------------------

def test_set_value_that_is_not_yaml(capsys):
    line = one_error(capsys, ["recipe", DEMO, "--set", "train.lr=[0.1"], "--set train.lr",
                     "'[0.1'", "not valid YAML", "column 5")
    assert "expected a YAML value" in line  # what was expected, not only what went wrong


@pytest.mark.parametrize("command", [
    ["pretrain", SAME_IMAGE], ["run", SAME_IMAGE], ["finetune", SAME_IMAGE],
    ["inspect-pairs", SAME_IMAGE], ["data", "stats", SAME_IMAGE]])
def test_set_value_that_is_not_yaml_in_every_command(capsys, tmp_path, command):
    out = tmp_path / "out"
    one_error(capsys, [*command, "--out", str(out), "--set", "loss.dense.temperature={0.2"]
              if command[0] != "data" else [*command, "--set", "loss.dense.temperature={0.2"],
              "--set loss.dense.temperature", "not valid YAML")
    assert not out.exists()


def test_set_value_that_is_not_yaml_in_a_sweep(capsys, tmp_path):
    sweep = write(tmp_path / "sweep.yaml", f"base: {SAME_IMAGE}\ngrid:\n  seed: [0, 1]\n")
    one_error(capsys, ["sweep", sweep, "--out", str(tmp_path / "out"), "--set",
                       "train.max_steps=[1"], "--set train.max_steps", "not valid YAML")
    assert not (tmp_path / "out").exists()


def test_set_key_with_an_empty_part(capsys):
    one_error(capsys, ["recipe", DEMO, "--set", "train..lr=0.1"], "train..lr", "empty part")


def test_recipe_file_that_is_not_yaml(capsys, tmp_path):
    bad = write(tmp_path / "bad.yaml", "name: bad\ntrain: {lr: [0.1}\n")
    one_error(capsys, ["recipe", bad], bad, "not valid YAML", "line 2, column 17")


def test_base_file_that_is_not_yaml(capsys, tmp_path):
    write(tmp_path / "base.yaml", "name: base\ndata:\n  source: synthetic\n   channels: 3\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\nname: child\n")
    line = one_error(capsys, ["recipe", child], str(tmp_path / "base.yaml"), "base of",
                     "child.yaml", "not valid YAML", "line 4")
    assert "column" in line


def test_sweep_file_that_is_not_yaml(capsys, tmp_path):
    sweep = write(tmp_path / "sweep.yaml", f"base: {SAME_IMAGE}\ngrid:\n  seed: [0, 1\n")
    one_error(capsys, ["sweep", sweep, "--out", str(tmp_path / "out")], sweep, "not valid YAML",
              "line")
    assert not (tmp_path / "out").exists()


# --- empty and non-mapping files ------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n"])
def test_empty_recipe_is_refused(capsys, tmp_path, text):
    empty = write(tmp_path / "empty.yaml", text)
    one_error(capsys, ["recipe", empty], empty, "is empty", "base: demo")


def test_empty_recipe_never_pretrains_the_defaults(capsys, tmp_path):
    empty = write(tmp_path / "empty.yaml", "")
    out = tmp_path / "out"
    one_error(capsys, ["pretrain", empty, "--out", str(out), *sets(["train.max_steps=1"])],
              empty, "is empty")
    assert not out.exists()


def test_empty_base_is_refused(capsys, tmp_path):
    write(tmp_path / "base.yaml", "")
    child = write(tmp_path / "child.yaml", "base: base.yaml\nname: child\n")
    one_error(capsys, ["recipe", child], str(tmp_path / "base.yaml"), "is empty", "child.yaml")


@pytest.mark.parametrize("text, found", [("- a\n- b\n", "a list"), ("hello\n", "'hello'"),
                                         ("3\n", "int 3")])
def test_recipe_that_is_not_a_mapping(capsys, tmp_path, text, found):
    path = write(tmp_path / "odd.yaml", text)
    one_error(capsys, ["recipe", path], path, "expected a YAML mapping", found)


def test_base_that_is_not_a_mapping(capsys, tmp_path):
    write(tmp_path / "base.yaml", "- data\n- pairs\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\nname: child\n")
    one_error(capsys, ["recipe", child], str(tmp_path / "base.yaml"), "a list")


def test_empty_sweep_file(capsys, tmp_path):
    sweep = write(tmp_path / "sweep.yaml", "# nothing yet\n")
    one_error(capsys, ["sweep", sweep, "--out", str(tmp_path / "out")], sweep, "is empty")
    assert not (tmp_path / "out").exists()


# --- names no registry holds: densessl recipe checks what pretrain / run build --------------

@pytest.mark.parametrize("override, names", [
    ("pairs.builder=bogus", ["pairs.builder", "'bogus'", "same_image", "cut_paste"]),
    ("data.source=bogus", ["data.source", "'bogus'", "synthetic", "folder"]),
    ("finetune.dataset=bogus", ["finetune.dataset", "'bogus'", "pidray", "mask_folder"]),
    ("pairs.options.bogus=1", ["pairs.options.bogus", "valid:", "synthetic_n"]),
    ("finetune.options.bogus=1", ["finetune.options.bogus", "valid:", "synthetic_n"]),
    ("finetune.options.synthetic_n=many", ["finetune.options.synthetic_n", "'many'"]),
    ("model.backbone=timm:vit_tiny_patch16_224", ["model.backbone", "vit_tiny_patch16_224",
                                                  "stride"]),
])
def test_recipe_checks_every_name(capsys, override, names):
    one_error(capsys, ["recipe", DEMO, "--set", override], "recipes/demo.yaml", *names)


def test_recipe_checks_the_source_options(capsys):
    one_error(capsys, ["recipe", SAME_IMAGE, "--set", "data.options.bogus=1"],
              "data.options.bogus", "num_images")


def test_recipe_checks_the_controls_run_pretrains(capsys):
    one_error(capsys, ["recipe", DEMO, "--set", "finetune.controls={c: {pairs.builder: bogus}}",
                       "--set", "finetune.inits=[pretrained, c]"],
              "finetune.controls.c", "pairs.builder", "'bogus'")


def test_pretrain_refuses_a_bad_name_before_touching_out(capsys, tmp_path):
    out = tmp_path / "out"
    one_error(capsys, ["pretrain", SAME_IMAGE, "--out", str(out),
                       *sets([*ONE_STEP, "pairs.builder=bogus"])], "pairs.builder", "'bogus'")
    assert not out.exists()


def test_run_refuses_a_bad_dataset_before_pretraining(capsys, tmp_path):
    out = tmp_path / "out"
    one_error(capsys, ["run", SAME_IMAGE, "--out", str(out),
                       *sets([*ONE_STEP, "finetune.dataset=bogus"])],
              "finetune.dataset", "'bogus'", "registered")
    assert not out.exists()  # no pretraining ran


def test_sweep_refuses_a_bad_cell_before_running(capsys, tmp_path):
    sweep = write(tmp_path / "sweep.yaml", f"base: {SAME_IMAGE}\n"
                  f"set: {{{', '.join(o.replace('=', ': ', 1) for o in ONE_STEP)}}}\n"
                  "grid:\n  pairs.builder: [same_image, bogus]\n")
    one_error(capsys, ["sweep", sweep, "--out", str(tmp_path / "out")], sweep,
              '"pairs.builder": "bogus"', "unknown builder")
    assert not (tmp_path / "out").exists()


def test_shipped_recipes_still_validate(capsys):
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        extra = ["data.path=/data", "finetune.path=/labeled"] if "own_xray" in path.name else []
        assert main(["recipe", str(path), *sets(extra)]) == 0, capsys.readouterr().err
