"""Loaders for real on-disk formats and built-in synthetic generators (sample dicts on CPU).

Every module here registers itself (see :mod:`densessl.data.registry`); importing the package
makes every source, synthesizer and inspector available to recipes and the CLI.
"""

from densessl.data.image_folder import ImageFolder
from densessl.data.registry import (INSPECTORS, SOURCES, SYNTHESIZERS, register_inspector,
                                    register_source, register_synthesizer)
from densessl.data.synthetic import SyntheticScenes

__all__ = ["INSPECTORS", "ImageFolder", "SOURCES", "SYNTHESIZERS", "SyntheticScenes",
           "register_inspector", "register_source", "register_synthesizer"]
