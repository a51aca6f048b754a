"""Per-image provenance (issue 17, part A): manifest reading, filters, roll-up into metrics.json,
encoder.json, the checkpoint and the attribution file, and ``data inspect --manifest``."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densessl.cli import main
from densessl.data.manifest import (
    canonical_licence,
    inherited_terms,
    read_manifest,
    select_images,
)
from densessl.errors import DataError

SAME_IMAGE = str(Path(__file__).parents[2] / "recipes" / "same_image.yaml")

# file, licence, author, flags (contains_people): the synthetic example manifest
TABLE = [
    ("a.png", "CC-BY-4.0", "Ann", False),
    ("b.png", "CC BY 4.0", "Bob", True),
    ("c.png", "CC0 1.0", "", False),
    ("d.png", "CC-BY-NC-SA-4.0", "Dee", False),
    ("sub/e.png", "CC-BY-SA-4.0", "Eve", False),
    ("sub/f.png", "", "Fay", False),                # no licence
    ("g.png", "my own licence", "Gus", False),      # unrecognised
]
UNLISTED = ["h.png"]                                # an image with no manifest row


def make_folder(root: Path, size: int = 48) -> list[str]:
    files = [row[0] for row in TABLE] + UNLISTED
    rng = np.random.default_rng(0)
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f)
    return files


def write_manifest(path: Path, rows=TABLE) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "licence", "author", "url", "contains_people"])
        for f, lic, author, people in rows:
            w.writerow([f, lic, author, f"https://example.org/{f}", "yes" if people else ""])
    return path


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    make_folder(root)
    return root, write_manifest(tmp_path / "manifest.csv")


def test_canonical_licences():
    expected = {"CC BY 4.0": "CC-BY-4.0", "cc-by-nc-sa-4.0": "CC-BY-NC-SA-4.0",
                "CC BY-SA-NC 3.0": "CC-BY-NC-SA-3.0", "CC0": "CC0-1.0", "cc0 1.0": "CC0-1.0",
                "": "unknown", "NOASSERTION": "unknown", "mit": "MIT",
                "Public Domain": "public-domain", "my own licence": "my own licence"}
    assert {k: canonical_licence(k) for k in expected} == expected


def test_inherited_terms():
    t = inherited_terms({"CC-BY-4.0": 3, "CC0-1.0": 2})
    assert t["commercial_use"] is True and t["attribution_images"] == 3
    t = inherited_terms({"CC-BY-4.0": 3, "CC-BY-NC-SA-4.0": 1})
    assert t["commercial_use"] is False and t["non_commercial_images"] == 1
    assert t["sharealike_images"] == 1 and "NON-COMMERCIAL" in t["statement"]
    assert "ShareAlike" in t["statement"]
    t = inherited_terms({"CC-BY-4.0": 3, "unknown": 2})
    assert t["commercial_use"] is None and t["unknown_licence_images"] == 2 and t["warnings"]


def test_csv_and_json_manifests_agree(tmp_path):
    csv_m = read_manifest(write_manifest(tmp_path / "m.csv"))
    entries = [{"file": f, "license": lic, "author": a, "url": f"https://example.org/{f}",
                "contains_people": p} for f, lic, a, p in TABLE]
    (tmp_path / "m.json").write_text(json.dumps({"images": entries}))
    json_m = read_manifest(tmp_path / "m.json")
    assert set(csv_m.rows) == set(json_m.rows) == {r[0] for r in TABLE}
    for f in csv_m.rows:
        a, b = csv_m.rows[f], json_m.rows[f]
        assert (a.licence, a.author, a.url, a.flags) == (b.licence, b.author, b.url, b.flags)
    assert csv_m.rows["b.png"].flags == {"contains_people": True}


@pytest.mark.parametrize("content, message", [
    ("file,licence,contains_people\na.png,CC0,maybe\n",
     "row 2 (file a.png), column contains_people: expected true/false"),
    ("licence,author\nCC0,x\n", "header with a 'file' column"),
    ("file,licence\na.png,CC0\na.png,CC-BY-4.0\n", "row 3: file 'a.png' is listed twice"),
    ("file,licence\n../a.png,CC0\n", "row 2, column file: '../a.png' must be relative"),
])
def test_bad_manifest_is_one_line_naming_row_and_column(tmp_path, content, message):
    path = tmp_path / "m.csv"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        read_manifest(path)
    assert str(path) in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_filters_count_every_drop(folder):
    root, manifest_path = folder
    manifest = read_manifest(manifest_path)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    keep, summary, rows = select_images(files, manifest, require=["licence"],
                                        allow_licences=["CC-BY-4.0", "CC0-1.0", "CC-BY-SA-4.0"],
                                        exclude_flags=["contains_people"])
    # independent reference: walk the table by hand
    by_file = {r[0]: r for r in TABLE}
    allowed = {"a.png", "c.png", "sub/e.png"}   # b.png is CC-BY-4.0 but contains people
    assert sorted(files[i] for i in keep) == sorted(allowed)
    assert summary["dropped"] == {"no_manifest_row": 1, "missing_licence": 1,
                                  "licence_not_allowed": 2, "flag_contains_people": 1}
    assert summary["images_used"] == 3 and summary["images_total"] == len(files)
    assert summary["licences"] == {"CC-BY-4.0": 1, "CC0-1.0": 1, "CC-BY-SA-4.0": 1}
    assert summary["terms"]["commercial_use"] is True
    assert summary["terms"]["sharealike_images"] == 1
    assert [r["author"] for r in rows] == [by_file[files[i]][2] for i in keep]
    with pytest.raises(DataError,
                       match="2 images lack licence .* data.provenance.on_missing is error"):
        select_images(files, manifest, require=["licence"], on_missing="error")


def test_pretrain_carries_provenance_everywhere(folder, tmp_path):
    root, manifest_path = folder
    out = tmp_path / "run"
    args = ["pretrain", SAME_IMAGE, "--out", str(out), "--set", "data.source=folder",
            "--set", f"data.path={root}", "--set", "data.options={}",
            "--set", f"data.manifest={manifest_path}",
            "--set", "data.provenance.exclude_flags=[contains_people]",
            "--set", "train.max_steps=1", "--set", "train.batch_size=4",
            "--set", "train.num_workers=0", "--set", "data.image_size=48",
            "--set", "augment.view_size=32", "--set", "loss.dense.queue_size=100",
            "--set", "loss.global.queue_size=8", "--set", "model.split_bn_groups=2"]
    with pytest.warns(UserWarning, match="unknown or unrecognised licence"):
        assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    prov = metrics["provenance"]
    # 8 images; b.png dropped for its flag; h.png (no row) kept as unknown, f.png (empty
    # licence) unknown, g.png unrecognised; d.png non-commercial
    assert prov["images_total"] == 8 and prov["images_used"] == 7
    assert prov["dropped"] == {"flag_contains_people": 1}
    assert prov["without_provenance"] == 1
    assert prov["licences"] == {"unknown": 2, "CC-BY-4.0": 1, "CC0-1.0": 1,
                                "CC-BY-NC-SA-4.0": 1, "CC-BY-SA-4.0": 1, "my own licence": 1}
    assert prov["terms"]["commercial_use"] is False
    assert prov["manifest_sha256"] == read_manifest(manifest_path).sha256
    encoder_json = json.loads((out / "encoder.json").read_text())
    assert encoder_json["provenance"] == prov
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["provenance"] == prov
    with (out / "attribution.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["file"] for r in rows) == sorted(
        [r[0] for r in TABLE if r[0] != "b.png"] + UNLISTED)
    assert {r["file"]: r["author"] for r in rows}["d.png"] == "Dee"


def test_manifest_with_a_builder_that_ignores_data_is_refused(folder, tmp_path, capsys):
    from densessl.pairs.base import PairBuilder
    from densessl.pairs.registry import available_pair_builders, register_pair_builder

    class OwnData(PairBuilder):  # reads its own data and takes no manifest
        def __init__(self, seed: int = 0) -> None:
            self.seed = seed

    name = "test_provenance_own_data"
    if name not in available_pair_builders():
        register_pair_builder(name)(OwnData)
    _, manifest_path = folder
    code = main(["pretrain", SAME_IMAGE, "--out", str(tmp_path / "x"),
                 "--set", f"pairs.builder={name}", "--set", "pairs.options={}",
                 "--set", f"data.manifest={manifest_path}"])
    assert code == 2
    assert f"data.manifest: pair builder {name!r} reads its own" in capsys.readouterr().err


def test_filters_without_manifest_are_refused(tmp_path, capsys):
    code = main(["recipe", SAME_IMAGE, "--set", "data.provenance.require=[licence]"])
    assert code == 2 and "need data.manifest" in capsys.readouterr().err


def test_data_inspect_reports_licences_missing_and_flagged(folder, capsys):
    root, manifest_path = folder
    assert main(["data", "inspect", str(root), "--format", "folder",
                 "--manifest", str(manifest_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 8
    prov = report["provenance"]
    assert prov["without_provenance"]["no_manifest_row"] == ["h.png"]
    assert prov["without_provenance"]["no_licence"] == ["sub/f.png"]
    assert prov["flagged"]["contains_people"] == {"count": 1, "files": ["b.png"]}
    assert sum(prov["licences"].values()) == 8


def test_export_carries_attribution_and_the_most_restrictive_terms(folder, tmp_path):
    from densessl.workflows.export import export_weights

    root, manifest_path = folder
    out = tmp_path / "run"
    with pytest.warns(UserWarning):
        assert main(["pretrain", SAME_IMAGE, "--out", str(out), "--set", "data.source=folder",
                     "--set", f"data.path={root}", "--set", "data.options={}",
                     "--set", f"data.manifest={manifest_path}",
                     "--set", "train.max_steps=1", "--set", "train.batch_size=4",
                     "--set", "train.num_workers=0", "--set", "data.image_size=48",
                     "--set", "augment.view_size=32", "--set", "loss.dense.queue_size=100",
                     "--set", "loss.global.queue_size=8", "--set", "model.split_bn_groups=2"]
                    ) == 0
    exported = export_weights(out / "encoder.pt", "timm", tmp_path / "enc.timm.pt")
    copy = tmp_path / "enc.timm.pt.attribution.csv"
    assert copy.read_text() == (out / "attribution.csv").read_text()
    card = json.loads((tmp_path / "enc.timm.pt.card.json").read_text())
    # d.png is CC-BY-NC-SA: non-commercial and ShareAlike; f, g, h: unknown → a warning
    assert card["terms"]["commercial_use"] is False
    assert card["terms"]["non_commercial_images"] == 1 and card["terms"]["sharealike_images"] == 2
    assert card["terms"]["unknown_licence_images"] == 3
    assert any("unknown or unrecognised licence" in w for w in card["warnings"])
    assert card["attribution_file"] == copy.name
    md = (tmp_path / "enc.timm.pt.card.md").read_text()
    assert "NON-COMMERCIAL use only" in md and "ShareAlike" in md and copy.name in md
    assert exported.is_file()


def test_card_terms_from_dataset_cards_without_manifest(tmp_path):
    from densessl.io import write_json
    from densessl.workflows.export import model_card

    weights = tmp_path / "encoder.pt"
    weights.write_bytes(b"x")
    write_json(tmp_path / "encoder.json", {"datasets": [{"name": "xBD",
                                                         "licence": "CC BY-NC-SA 4.0"}]})
    card = model_card(weights, weights, "timm", "resnet18", 3, False)
    assert card["terms"]["commercial_use"] is False and card["terms"]["sharealike_images"] == 1
    write_json(tmp_path / "encoder.json", {"data_source": "synthetic"})
    card = model_card(weights, weights, "timm", "resnet18", 3, False)
    assert card["terms"]["commercial_use"] is True and card["warnings"] == []
    write_json(tmp_path / "encoder.json", {"data_source": "folder"})
    card = model_card(weights, weights, "timm", "resnet18", 3, False)
    assert card["terms"]["commercial_use"] is None and card["warnings"]
