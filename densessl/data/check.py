"""``densessl data inspect ROOT --check``: decode every file of a dataset, list the bad ones,
and list what the format's own loader refuses.

The inspectors read headers only (fast on large sets), and a truncated PNG, JPEG or GeoTIFF
has a sound header: only decoding all of its pixels finds it. The check decodes the way
training does (:func:`densessl.data.decode.decode_image`; rasterio for GeoTIFFs, block by
block so a large scene never sits in memory whole).

It then runs the format's checker (:data:`densessl.data.registry.CHECKERS`), which builds the
format's loader as pretraining or fine-tuning does, with ``skip_bad`` on so that every
problem is listed, not just the first (:func:`densessl.data.bad_samples.refusals`): missing
files, annotations pointing at missing images, all-nodata dates, date pairs without
overlap, band counts, CRS. Each is something a run without ``data.skip_bad`` refuses.
"""

from __future__ import annotations

from pathlib import Path

from densessl.data.decode import decode_image
from densessl.data.image_folder import IMAGE_EXTENSIONS, list_images
from densessl.data.registry import CHECKERS
from densessl.errors import DataError

RASTER_EXTENSIONS = (".tif", ".tiff")


def _check_raster(path: Path) -> None:
    import rasterio

    try:
        with rasterio.open(path) as src:
            for _, window in src.block_windows(1):
                src.read(window=window)
    except rasterio.errors.RasterioError as exc:
        raise DataError(f"{path}: cannot read GeoTIFF ({exc})") from None


#: formats whose files are rasters read with rasterio (block by block), not images
RASTER_FORMATS = ("geotiff", "geotiff_tiles", "geotiff_masks")


def check_files(root: str | Path, fmt: str) -> dict:
    """``{"files": N decoded, "bad": [one line per file that fails]}`` for every image file
    under ``root`` (every .tif/.tiff with rasterio for the :data:`RASTER_FORMATS`;
    ``geotiff_tiles``: the scenes its source reads — a folder, recursively, or one file)."""
    root = Path(root)
    if fmt == "geotiff_tiles":
        from densessl.data.geotiff_tiles import scene_files

        files = sorted(scene_files(root))
        read = _check_raster
    elif fmt in RASTER_FORMATS:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in RASTER_EXTENSIONS)
        read = _check_raster
    else:
        files = list_images(root) if root.is_dir() else [root]
        files = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
        read = decode_image
    bad = []
    for path in files:
        try:
            read(path)
        except DataError as exc:
            bad.append(str(exc))
    return {"files": len(files), "bad": bad}


def loader_refusals(root: str | Path, fmt: str, options: dict | None = None) -> list[str]:
    """What the ``fmt`` loader refuses in ``root`` (one line per problem, naming the file),
    built with ``options`` (the recipe's ``data.options`` / ``finetune.options`` keys, e.g.
    ``pattern``, ``image_size``); ``[]`` for a format without a checker."""
    checker = CHECKERS.get(fmt)
    return [] if checker is None else checker(Path(root), dict(options or {}))
