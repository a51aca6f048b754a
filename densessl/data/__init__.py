"""Loaders for real on-disk formats and built-in synthetic generators (sample dicts on CPU)."""

from densessl.data.image_folder import ImageFolder
from densessl.data.synthetic import SyntheticScenes

__all__ = ["ImageFolder", "SyntheticScenes"]
