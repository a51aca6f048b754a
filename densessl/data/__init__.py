"""Loaders for real on-disk formats and built-in synthetic generators (sample dicts on CPU).

Every module here registers itself (see :mod:`densessl.data.registry`); importing the package
makes every source, synthesizer and inspector available to recipes and the CLI.
"""

from densessl.data.geotiff import GeoTiffPairs  # noqa: F401  (registers geotiff)
from densessl.data.geotiff_tiles import GeoTiffTiles  # noqa: F401  (registers geotiff_tiles)
from densessl.data.image_folder import ImageFolder
from densessl.data.labeled import build as _labeled  # noqa: F401  (registers every labeled set)
from densessl.data.noisy_seg import NoisySegPairs  # noqa: F401  (registers noisy-seg)
from densessl.data.pidray import PIDray  # noqa: F401  (registers pidray source + inspector)
from densessl.data.registry import (
                                    INSPECTORS,
                                    SOURCES,
                                    SYNTHESIZERS,
                                    register_inspector,
                                    register_source,
                                    register_synthesizer,
)
from densessl.data.sixray import SIXray  # noqa: F401  (registers sixray source + inspector)
from densessl.data.synthetic import SyntheticScenes
from densessl.data.xbd import XBDDataset, XBDTiles  # noqa: F401  (registers xbd)
from densessl.data.xray_synth import synthesize_xray  # noqa: F401  (registers xray)

__all__ = ["INSPECTORS", "ImageFolder", "SOURCES", "SYNTHESIZERS", "SyntheticScenes",
           "register_inspector", "register_source", "register_synthesizer"]
