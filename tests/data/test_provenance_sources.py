"""Per-image provenance for the sources that read their own files (issue 17, part A):
cut_paste (PIDray segments + SIXray backgrounds) and temporal (xBD pre/post, GeoTIFF dates).

Fixtures are the repo's synthesizers at tiny sizes plus a synthetic manifest; expectations are
computed here from the manifest table and independent listings, not from the filter code."""

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from densessl.cli import main
from densessl.data.manifest import ProvenanceFilter, canonical_licence
from densessl.errors import DataError

RECIPES = Path(__file__).parents[2] / "recipes"
PEOPLE = "contains_people"


def write_manifest(path: Path, table: dict[str, tuple[str, bool]]) -> Path:
    """``table``: file → (licence, contains_people)."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "licence", "author", "url", PEOPLE])
        for f, (lic, people) in table.items():
            w.writerow([f, lic, f"author of {f}", f"https://example.org/{f}",
                        "yes" if people else "no"])
    return path


def passes(table, file, allow=None) -> bool:
    """The filters used below, by hand: a row, a licence, not flagged, allowed."""
    if file not in table:
        return False
    lic, people = table[file]
    return bool(lic) and not people and (allow is None or canonical_licence(lic) in allow)


# ------------------------------------------------------------------ cut_paste


@pytest.fixture(scope="module")
def xray(tmp_path_factory):
    from densessl.data.sixray import SIXray
    from densessl.data.xray_synth import synthesize_xray
    from densessl.pairs.cut_paste import CutPastePairs

    base = tmp_path_factory.mktemp("xray")
    root = synthesize_xray(base / "data", n=8, seed=0, size=64)
    cache = base / "cache"
    # the unfiltered builder: what the pairs would draw without a manifest
    full = CutPastePairs(str(root / "pidray"), str(root / "sixray"), k=1, image_size=32,
                         cache_dir=str(cache))
    # independent listings: SIXray negatives by their item paths, bank segments by the
    # "source" name the bank has always recorded (file name#annotation id)
    negatives = [f"sixray/JPEGImage/{file.name}"
                 for file, _ in SIXray(root / "sixray", which="negative").items]
    seg_files = [f"pidray/train/{s['source'].split('#')[0]}" for s in full.segments.segments]
    assert len(negatives) >= 3 and len(set(seg_files)) >= 4
    table = {}
    for i, f in enumerate(negatives):
        if i == 0:
            continue                                    # no row
        table[f] = (["CC0-1.0", "CC-BY-NC-4.0", "CC-BY-4.0"][i % 3], i == 1)
    for i, f in enumerate(sorted(set(seg_files))):
        table[f] = ("" if i == 0 else ["CC-BY-SA-4.0", "CC-BY-4.0"][i % 2], i == 2)
    manifest = write_manifest(base / "manifest.csv", table)
    return root, cache, manifest, table, negatives, seg_files


def test_cut_paste_drops_backgrounds_and_segments_by_source_image(xray):
    from densessl.pairs.cut_paste import CutPastePairs

    root, cache, manifest, table, negatives, seg_files = xray
    builder = CutPastePairs(str(root / "pidray"), str(root / "sixray"), k=1, image_size=32,
                            cache_dir=str(cache), provenance=ProvenanceFilter(
                                manifest, require=["licence"], exclude_flags=[PEOPLE]))
    kept_bg = [f for f in negatives if passes(table, f)]
    kept_seg = [i for i, f in enumerate(seg_files) if passes(table, f)]
    assert [f"sixray/JPEGImage/{file.name}" for file, _ in builder.backgrounds.items] == kept_bg
    assert builder.segment_ids == kept_seg
    # every draw uses kept files only (a dropped file is missing from the sample lists)
    for i in range(60):
        bg_a, bg_b, _, picks, *_ = builder._draw(i)
        assert builder.backgrounds.items[bg_a][0].name in {f.rsplit("/", 1)[1] for f in kept_bg}
        assert all(passes(table, seg_files[j]) for j in picks)
    s = builder[0]
    assert s.source_a.shape == (3, 32, 32)
    summary = builder.image_provenance
    used = kept_bg + sorted({seg_files[i] for i in kept_seg})
    every = negatives + sorted(set(seg_files))
    assert summary["images_total"] == len(every) and summary["images_used"] == len(used)
    assert summary["licences"] == dict(Counter(canonical_licence(table[f][0]) for f in used))
    reasons = Counter("no_manifest_row" if f not in table else "missing_licence"
                      if not table[f][0] else "flag_contains_people"
                      for f in every if not passes(table, f))
    assert summary["dropped"] == dict(reasons)
    assert (summary["backgrounds_used"], summary["segments_used"]) == (len(kept_bg),
                                                                      len(kept_seg))
    assert summary["manifest_rows_unmatched"] == 0 and summary["warnings"] == []
    assert sorted(r["file"] for r in builder.attribution) == sorted(used)


def test_cut_paste_require_licence_on_missing_error_names_the_file(xray):
    from densessl.pairs.cut_paste import CutPastePairs

    root, cache, manifest, _, negatives, _ = xray
    with pytest.raises(DataError, match=rf"lack licence \(e.g. '{negatives[0]}' in "
                                        rf".*on_missing is error"):
        CutPastePairs(str(root / "pidray"), str(root / "sixray"), k=1, image_size=32,
                      cache_dir=str(cache), provenance=ProvenanceFilter(
                          manifest, require=["licence"], on_missing="error"))


def test_cut_paste_too_few_segments_left_is_a_clear_error(xray):
    from densessl.pairs.cut_paste import CutPastePairs

    root, cache, manifest, table, _, seg_files = xray
    allow = {"CC0-1.0", "CC-BY-4.0"}
    left = sum(passes(table, f, allow) for f in seg_files)
    assert 0 < left < len(seg_files)
    with pytest.raises(DataError, match=rf"{left} of {len(seg_files)} segments are left after "
                                        rf"the filters .* fewer than pairs.options.k = {left + 1}"):
        CutPastePairs(str(root / "pidray"), str(root / "sixray"), k=left + 1, image_size=32,
                      cache_dir=str(cache), provenance=ProvenanceFilter(
                          manifest, exclude_flags=[PEOPLE], allow_licences=["CC0-1.0",
                                                                            "CC-BY-4.0"]))


def test_cut_paste_recipe_carries_the_manifest(xray):
    from densessl.build import build_pair_builder
    from densessl.recipe import load_recipe

    root, cache, manifest, table, negatives, seg_files = xray
    recipe = load_recipe(RECIPES / "xray_segloc.yaml", [
        f"pairs.options.pidray_root={root / 'pidray'}",
        f"pairs.options.sixray_root={root / 'sixray'}", f"pairs.options.cache_dir={cache}",
        "pairs.options.k=1", "data.image_size=32", "augment.view_size=32",
        f"data.manifest={manifest}",
        "data.provenance.allow_licences=[CC-BY-4.0, CC0-1.0]"])
    builder = build_pair_builder(recipe)
    # no flag excluded here, nothing required: a row with an allowed licence is enough
    allowed = {f for f in negatives + seg_files
               if f in table and canonical_licence(table[f][0]) in {"CC-BY-4.0", "CC0-1.0"}}
    assert builder.image_provenance["images_used"] == len(allowed)
    assert builder.image_provenance["licences"] == dict(
        Counter(canonical_licence(table[f][0]) for f in allowed))
    # data.path is the common root when set: rows are then relative to it
    recipe = load_recipe(RECIPES / "xray_segloc.yaml", [
        f"pairs.options.pidray_root={root / 'pidray'}",
        f"pairs.options.sixray_root={root / 'sixray'}", f"pairs.options.cache_dir={cache}",
        "pairs.options.k=1", "data.image_size=32", "augment.view_size=32",
        f"data.manifest={manifest}",
        f"data.path={root / 'pidray'}"])
    with pytest.raises(DataError, match="is not under data.path"):
        build_pair_builder(recipe)


def test_data_inspect_pidray_and_sixray_with_a_manifest_root(xray, capsys):
    root, _, manifest, table, negatives, _ = xray
    assert main(["data", "inspect", str(root / "sixray"), "--format", "sixray",
                 "--manifest", str(manifest), "--manifest-root", str(root)]) == 0
    prov = json.loads(capsys.readouterr().out)["provenance"]
    jpgs = sorted(f"sixray/{p.relative_to(root / 'sixray').as_posix()}"
                  for p in (root / "sixray").rglob("*.jpg"))
    assert prov["images"] == len(jpgs)
    assert prov["without_provenance"]["no_manifest_row"] == [f for f in jpgs if f not in table]
    assert prov["flagged"][PEOPLE]["files"] == [f for f in jpgs if f in table and table[f][1]]
    assert main(["data", "inspect", str(root / "pidray"), "--format", "pidray",
                 "--manifest", str(manifest), "--manifest-root", str(root)]) == 0
    prov = json.loads(capsys.readouterr().out)["provenance"]
    listed = [f for f in table if f.startswith("pidray/")]
    assert prov["without_provenance"]["no_licence"] == [f for f in listed if not table[f][0]]


# ------------------------------------------------------------------ xBD


@pytest.fixture(scope="module")
def xbd(tmp_path_factory):
    from densessl.data.xbd import scan_xbd
    from densessl.data.xbd_synth import synthesize_xbd

    base = tmp_path_factory.mktemp("xbdprov")
    root = synthesize_xbd(base / "data", n=4, seed=3, size=64)
    pairs = [(p.pre.relative_to(root).as_posix(), p.post.relative_to(root).as_posix())
             for p in scan_xbd(root)]
    assert len(pairs) >= 4
    table = {}
    for k, (pre, post) in enumerate(pairs):
        table[pre] = ("CC-BY-4.0" if k % 2 else "CC-BY-NC-SA-4.0", False)
        table[post] = ("CC0-1.0", k == 1)           # pair 1: the post image is flagged
    del table[pairs[2][0]]                          # pair 2: the pre image has no row
    return root, write_manifest(base / "manifest.csv", table), table, pairs


def test_xbd_pair_used_only_if_both_images_pass(xbd, monkeypatch):
    import densessl.data.xbd as xbd_module
    from densessl.data.xbd import XBDTiles

    root, manifest, table, pairs = xbd
    tiles = XBDTiles(root, image_size=32, tiles_per_pair=2, provenance=ProvenanceFilter(
        manifest, require=["licence"], exclude_flags=[PEOPLE]))
    kept = [p for p in pairs if passes(table, p[0]) and passes(table, p[1])]
    assert [(p.pre.name, p.post.name) for p in tiles.pairs] == [
        tuple(f.rsplit("/", 1)[1] for f in p) for p in kept]
    assert len(tiles) == 2 * len(kept)
    read = []
    real = xbd_module.read_rgb
    monkeypatch.setattr(xbd_module, "read_rgb", lambda path: read.append(path) or real(path))
    for i in range(len(tiles)):
        tiles[i]
    used = {f for p in kept for f in p}
    assert {Path(p).relative_to(root).as_posix() for p in read} == used
    s = tiles.image_provenance
    assert (s["pairs_total"], s["pairs_used"]) == (len(pairs), len(kept))
    assert s["images_total"] == 2 * len(pairs) and s["images_used"] == len(used)
    # pair 1's pre and pair 2's post pass but their partner does not
    assert s["dropped"] == {"flag_contains_people": 1, "no_manifest_row": 1,
                            "partner_dropped": 2}
    assert s["licences"] == dict(Counter(canonical_licence(table[f][0]) for f in used))
    assert sorted(r["file"] for r in tiles.attribution) == sorted(used)


def test_xbd_on_missing_error_names_the_file(xbd):
    from densessl.data.xbd import XBDTiles

    root, manifest, _, pairs = xbd
    with pytest.raises(DataError, match=rf"e.g. '{pairs[2][0]}' in {manifest}"):
        XBDTiles(root, image_size=32, provenance=ProvenanceFilter(
            manifest, require=["licence"], on_missing="error"))


def test_data_inspect_xbd_counts_images_and_pairs(xbd, capsys):
    root, manifest, table, pairs = xbd
    assert main(["data", "inspect", str(root), "--format", "xbd",
                 "--manifest", str(manifest)]) == 0
    prov = json.loads(capsys.readouterr().out)["provenance"]
    files = [f for p in pairs for f in p]
    assert prov["images"] == len(files)           # targets/*.png are not training images
    assert prov["without_provenance"]["no_manifest_row"] == [pairs[2][0]]
    assert prov["flagged"][PEOPLE]["files"] == [pairs[1][1]]
    assert prov["pairs"] == {"total": len(pairs), "with_provenance": len(pairs) - 1}
    assert sum(prov["licences"].values()) == len(files)


def test_temporal_pretrain_carries_provenance_like_a_folder(xbd, tmp_path):
    """End to end through the Python API: metrics.json, encoder.json, the checkpoint, the
    attribution file and the exported model card."""
    from densessl.workflows.export import export_weights
    from densessl.workflows.pretraining import pretrain

    root, manifest, table, pairs = xbd
    out = tmp_path / "run"
    pretrain(RECIPES / "xbd_temporal.yaml", out, overrides=[
        f"data.path={root}", f"data.manifest={manifest}",
        f"data.provenance.exclude_flags=[{PEOPLE}]", "train.max_steps=1",
        "train.batch_size=4", "train.num_workers=0", "data.image_size=48",
        "augment.view_size=32", "loss.dense.queue_size=100", "loss.global.queue_size=8",
        "model.split_bn_groups=2"], progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    prov = metrics["provenance"]
    # pair 2's pre has no row but nothing is required: kept as unknown; pair 1 dropped
    kept = [p for k, p in enumerate(pairs) if k != 1]
    used = {f for p in kept for f in p}
    assert prov["images_used"] == len(used) and prov["pairs_used"] == len(kept)
    assert prov["dropped"] == {"flag_contains_people": 1, "partner_dropped": 1}
    # the one file without a row takes the source's card licence (data.path given: the xBD
    # card's CC BY-NC-SA 4.0)
    assert prov["licences"] == dict(Counter(canonical_licence(table[f][0]) if f in table
                                            else "CC-BY-NC-SA-4.0" for f in used))
    assert prov["without_provenance"] == 1
    assert json.loads((out / "encoder.json").read_text())["provenance"] == prov
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["provenance"] == prov
    with (out / "attribution.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["file"] for r in rows) == sorted(used)
    export_weights(out / "encoder.pt", "timm", tmp_path / "enc.pt")
    assert (tmp_path / "enc.pt.attribution.csv").read_text() == (
        out / "attribution.csv").read_text()
    card = json.loads((tmp_path / "enc.pt.card.json").read_text())
    assert card["terms"]["commercial_use"] is False   # CC-BY-NC-SA pre images


# ------------------------------------------------------------------ GeoTIFF


def test_geotiff_pairs_need_both_dates_and_dropped_files_are_never_read(tmp_path):
    from densessl.data.geotiff import GeoTiffPairs
    from densessl.data.geotiff_synth import synthesize_geotiff

    root = synthesize_geotiff(tmp_path / "series", n=2, seed=0, size=48, bands=2)
    files = sorted(p.name for p in root.glob("*.tif"))
    assert len(files) == 6                          # 2 places × 3 dates
    dropped = files[1]                              # the middle date of the first place
    table = {f: ("CC-BY-NC-4.0" if f == dropped else "CC-BY-4.0", False) for f in files}
    manifest = write_manifest(tmp_path / "m.csv", table)
    dataset = GeoTiffPairs(str(root), image_size=32, channels=2, min_valid=0.05,
                           pattern=r"(?P<place>.+)_(?P<date>\d{8})\.tif$",
                           cache_dir=str(tmp_path / "cache"), provenance=ProvenanceFilter(
                               manifest, allow_licences=["CC-BY-4.0"]))
    # pairing "all": 3 pairs per place; the dropped date takes 2 of the first place's
    assert len(dataset.pairs) == 4
    assert all(dropped not in (p.early.path.name, p.late.path.name) for p in dataset.pairs)
    # the band statistics read only the kept files
    stats = json.loads(dataset.stats_path.read_text())
    assert sorted(Path(f).name for f in stats["files"]) == [f for f in files if f != dropped]
    s = dataset.image_provenance
    assert (s["pairs_total"], s["pairs_used"]) == (6, 4)
    assert s["dropped"] == {"licence_not_allowed": 1}
    assert s["licences"] == {"CC-BY-4.0": 5} and s["images_used"] == 5
    for i in range(len(dataset)):
        meta = dataset[i]["meta"]
        assert dropped not in (Path(meta["t0"]).name, Path(meta["t1"]).name)


def test_cut_paste_pretrain_carries_provenance_like_a_folder(xray, tmp_path):
    from densessl.workflows.pretraining import pretrain

    root, cache, manifest, table, negatives, seg_files = xray
    out = tmp_path / "run"
    metrics = pretrain(RECIPES / "xray_segloc.yaml", out, overrides=[
        f"pairs.options.pidray_root={root / 'pidray'}",
        f"pairs.options.sixray_root={root / 'sixray'}", f"pairs.options.cache_dir={cache}",
        "pairs.options.k=1", "pairs.options.num_pairs=8", f"data.manifest={manifest}",
        "data.provenance.require=[licence]", f"data.provenance.exclude_flags=[{PEOPLE}]",
        "train.max_steps=1", "train.batch_size=4", "train.num_workers=0",
        "data.image_size=48", "augment.view_size=32", "loss.dense.queue_size=100",
        "loss.global.queue_size=8", "model.split_bn_groups=2"], progress=False)
    used = sorted({f for f in negatives + seg_files if passes(table, f)})
    prov = metrics["provenance"]
    assert prov["images_used"] == len(used)
    assert prov["licences"] == dict(Counter(canonical_licence(table[f][0]) for f in used))
    assert json.loads((out / "metrics.json").read_text())["provenance"] == prov
    assert json.loads((out / "encoder.json").read_text())["provenance"] == prov
    with (out / "attribution.csv").open() as fh:
        assert sorted(r["file"] for r in csv.DictReader(fh)) == used
