"""Per-image provenance for cut-paste pairs: backgrounds and pasted segments both teach the
encoder, so both are filtered by ``data.manifest`` (issue 17, part A).

Manifest rows name files relative to one *common root*: ``data.path`` when the recipe sets it
(it must hold both the PIDray and the SIXray root), otherwise the deepest folder holding both
roots. With the usual layout ``/data/pidray`` + ``/data/sixray`` (and the synthetic set
``densessl data synth xray`` writes) the rows are ``pidray/train/xray_00001.png`` and
``sixray/JPEGImage/N00001.jpg``. A segment is used only if its source image passes the filters;
a background only if its own file does. The summary counts images (each file once; a source
image with several segments is one image) plus ``backgrounds_total/used`` and
``segments_total/used``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from densessl.data.image_folder import list_images
from densessl.data.manifest import ProvenanceFilter, relative_posix
from densessl.errors import DataError, RecipeError


def common_root(pidray_root: str | Path, sixray_root: str | Path,
                root: str | Path | None) -> Path:
    """The folder manifest rows are relative to: ``root`` (data.path) or the deepest folder
    holding both dataset roots."""
    if root is not None:
        return Path(root)
    return Path(os.path.commonpath([Path(pidray_root).resolve(), Path(sixray_root).resolve()]))


def filter_paste_sources(provenance: ProvenanceFilter, segments, backgrounds,
                         segment_ids: Sequence[int], k: int
                         ) -> tuple[list[int], dict, list[dict]]:
    """Apply ``provenance`` to a cut-paste builder's sources, once, at construction.

    ``segments``: a :class:`~densessl.data.segment_bank.SegmentBank` (``root``,
    ``source_files()``); ``backgrounds``: a :class:`~densessl.data.sixray.SIXray`
    (``root``, ``provenance_files()``, ``restrict()``), restricted here in place;
    ``segment_ids``: the bank indices the builder draws from (after its class filter).
    Returns (kept segment ids, summary, attribution rows of the used images).
    """
    if not (hasattr(segments, "source_files") and hasattr(backgrounds, "provenance_files")):
        raise RecipeError("data.manifest: cut_paste with ready-made segments/backgrounds has "
                          "no image files for manifest rows to name; give pidray_root and "
                          "sixray_root (or neither, for the synthetic set)")
    root = common_root(segments.root, backgrounds.root, provenance.root)
    # one prefix per dataset root, then plain string joins (no per-file resolve)
    seg_prefix = relative_posix(segments.root, root, "data.path (the manifest root)")
    bg_prefix = relative_posix(backgrounds.root, root, "data.path (the manifest root)")

    def under(prefix: str, rel: str) -> str:
        return rel if prefix == "." else f"{prefix}/{rel}"

    bg_files = [under(bg_prefix, f) for f in backgrounds.provenance_files()]
    bank_files = segments.source_files()
    seg_files = [under(seg_prefix, bank_files[i]) for i in segment_ids]
    cards = {bg_prefix: (getattr(backgrounds, "dataset_cards", None) or [{}])[0],
             seg_prefix: (getattr(segments, "dataset_cards", None) or [{}])[0]}

    def card_licence_of(file: str) -> str | None:
        # a file without a manifest row: its own dataset's card licence
        prefix = bg_prefix if file in bg_set else seg_prefix
        return cards[prefix].get("licence")

    bg_set = set(bg_files)
    items = [(f,) for f in bg_files] + [(f,) for f in seg_files]
    # rows of images the pairs never draw (SIXray positives, PIDray images without a segment,
    # test splits) are not "files the source does not have": no warning for them
    listed = [under(prefix, p.relative_to(base).as_posix())
              for prefix, base in ((seg_prefix, Path(segments.root)),
                                   (bg_prefix, Path(backgrounds.root)))
              for p in list_images(base)]
    keep, summary, rows = provenance.select(
        items, f"cut_paste (backgrounds under {str(backgrounds.root)!r}, segments from "
        f"{str(segments.root)!r})", card_licence_of=card_licence_of, listed=listed)
    n_bg = len(bg_files)
    kept_bg = [i for i in keep if i < n_bg]
    kept_seg = [segment_ids[i - n_bg] for i in keep if i >= n_bg]
    if not kept_bg:
        raise DataError(f"data.provenance: every background under {str(backgrounds.root)!r} "
                        f"was dropped (images dropped: {summary['dropped']}); check the "
                        f"manifest {str(provenance.manifest)!r} (rows relative to {str(root)!r})")
    if len(kept_seg) < k:
        raise DataError(f"data.provenance: {len(kept_seg)} of {len(seg_files)} segments are "
                        f"left after the filters (images dropped: {summary['dropped']}), fewer "
                        f"than pairs.options.k = {k}; check the manifest "
                        f"{str(provenance.manifest)!r} (rows relative to {str(root)!r})")
    if len(kept_bg) < n_bg:
        backgrounds.restrict(kept_bg)
    summary.update({"manifest_root": str(root), "backgrounds_total": n_bg,
                    "backgrounds_used": len(kept_bg), "segments_total": len(seg_files),
                    "segments_used": len(kept_seg)})
    return kept_seg, summary, rows
