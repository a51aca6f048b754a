"""The custom-pairing API: README snippet, the two examples, boundary validation, helpers."""

import re
from pathlib import Path

import pytest
import torch
from helpers import colours_agree, coordinate_image
from torch.utils.data import Dataset

from densessl.augment import ViewAugmentation
from densessl.cli import main
from densessl.contract import PairSample
from densessl.errors import PairContractError, RecipeError
from densessl.pairs import PairBuilder, collate_pairs, get_pair_builder
from densessl.pairs.correspondence import (
    flow_correspondence,
    homography_correspondence,
    instance_correspondence,
)

ROOT = Path(__file__).resolve().parents[2]


def readme_section_code(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    return "\n".join(re.findall(r"```python\n(.*?)```", section, flags=re.S))


def test_readme_custom_builder_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = readme_section_code("Write your own pair builder")
    assert "register_pair_builder" in code and "densessl.pretrain" in code
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "runs/shifted_copy/encoder.pt").is_file()
    assert namespace["metrics"]["steps"] == 2


@pytest.mark.parametrize("name", ["two_sensors", "known_motion"])
def test_examples_pretrain_from_their_recipes(name, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name the builder by file, relative to the repo root
    source = ROOT / "examples" / f"{name}.py"
    assert len(source.read_text().splitlines()) < 60
    out = tmp_path / name
    assert main(["pretrain", f"examples/{name}.yaml", "--out", str(out), "--set",
                 "train.max_steps=2", "--set", "train.batch_size=4"]) == 0
    assert (out / "encoder.pt").is_file()


class CoordinateImages(Dataset):
    """Every pixel painted with its own (x, y) — a unique, linearly interpolable colour."""

    def __init__(self, n=8, size=64):
        self.image = coordinate_image(size)
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return {"image": self.image}


def test_known_motion_correspondence_by_colour(monkeypatch):
    monkeypatch.chdir(ROOT)
    builder_cls = get_pair_builder("examples/known_motion.py:KnownMotionPairs")
    builder = builder_cls(CoordinateImages(), max_shift=0.1, max_degrees=15)
    torch.manual_seed(0)
    augment = ViewAugmentation(3, view_size=48, grid_stride=4,
                               geometry=dict(crop_scale=(0.3, 1.0), hflip=0.5,
                                             rotation_degrees=20, rotation_p=1.0),
                               photometry=None, mean=0.0, std=1.0)
    pair = augment(collate_pairs([builder[i] for i in range(8)]))
    _, agree = colours_agree(pair, 48, cells=12, size=64)
    assert pair.valid_ab.sum() > 300
    assert agree[pair.valid_ab].float().mean() >= 0.99


class BrokenBuilder(PairBuilder):
    def __init__(self, **changes):
        self.changes = changes

    def __len__(self):
        return 1

    def build(self, index):
        image = torch.rand(3, 16, 16)
        fields = dict(source_a=image, source_b=image)
        fields.update(self.changes)
        return PairSample(**fields)


@pytest.mark.parametrize("changes, field", [
    (dict(source_b=torch.rand(3, 16)), "source_b"),
    (dict(source_b=torch.rand(4, 16, 16)), "source_b"),
    (dict(base_grid=torch.zeros(16, 16)), "base_grid"),
    (dict(base_grid=torch.full((16, 16, 2), 40.0)), "base_grid"),
    (dict(valid_b=torch.ones(8, 8, dtype=torch.bool)), "valid_b"),
    (dict(boxes_a=torch.zeros(2, 4), boxes_b=torch.zeros(2, 4)), "instance_ids"),
    (dict(boxes_a=torch.zeros(2, 4), boxes_b=torch.zeros(1, 4)), "boxes_b"),
])
def test_contract_violations_name_builder_and_field(changes, field):
    with pytest.raises(PairContractError, match=rf"BrokenBuilder: field '{field}'"):
        BrokenBuilder(**changes)[0]


def test_outside_positions_are_fine_when_marked_invalid():
    grid = torch.full((16, 16, 2), 40.0)
    BrokenBuilder(base_grid=grid, base_valid=torch.zeros(16, 16, dtype=torch.bool))[0]


def test_builder_lookup_errors_are_recipe_errors():
    with pytest.raises(RecipeError, match="unknown builder 'nope'"):
        get_pair_builder("nope")
    with pytest.raises(RecipeError, match="not found"):
        get_pair_builder("missing/file.py:Thing")
    with pytest.raises(RecipeError, match="has no 'Nope'"):
        get_pair_builder("densessl.pairs:Nope")


def test_homography_and_flow_helpers_agree():
    motion = torch.tensor([[1.0, 0.0, 3.0], [0.0, 1.0, -2.0], [0.0, 0.0, 1.0]])
    grid_h, valid_h = homography_correspondence(motion, (10, 12), (10, 12))
    flow = torch.zeros(10, 12, 2)
    flow[..., 0], flow[..., 1] = 3.0, -2.0
    grid_f, valid_f = flow_correspondence(flow, (10, 12))
    torch.testing.assert_close(grid_h, grid_f)
    assert torch.equal(valid_h, valid_f)
    # pixels that move off source B are invalid: x + 3 > 11.5 or y - 2 < -0.5
    assert not valid_h[:, 9:].any() and not valid_h[:2].any() and valid_h[2:, :9].all()


def test_instance_helper_handles_paste_order_and_occlusion():
    # (exactness at every pixel, by colour against a brute force: test_instance_correspondence)
    size = (12, 12)
    first = torch.zeros(size, dtype=torch.bool)
    first[1:8, 1:8] = True
    second = torch.zeros(size, dtype=torch.bool)
    second[5:11, 5:11] = True                    # pasted later: covers part of `first` in A
    shift = lambda dx: torch.tensor([[1.0, 0, dx], [0, 1, 0], [0, 0, 1]])  # noqa: E731
    second_b = torch.zeros(size, dtype=torch.bool)
    second_b[5:11, 2:8] = True                   # in B it moves 3 px left, over `first`
    grid, valid = instance_correspondence(size, size, [first, second], [shift(0), shift(-3)],
                                          [first, second_b])
    assert grid[6, 6].tolist() == [3.0, 6.0]     # covered pixel follows the later paste
    assert grid[3, 3].tolist() == [3.0, 3.0] and valid[3, 3]
    assert not valid[1, 3]                       # on the edge of `first` in A
    assert not valid[6, 3]                       # interior in A, covered by `second` in B
    assert valid[7, 9] and not valid[7, 10]      # second: interior; edge of the paste
    assert not valid[0, 0]                       # background has no match
