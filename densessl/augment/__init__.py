"""Device-side view augmentation (kornia) and exact correspondence: SourceBatch → PairBatch."""

from densessl.augment.correspondence import compose_correspondence
from densessl.augment.geometry import ViewGeometry
from densessl.augment.photometric import ViewPhotometry
from densessl.augment.views import ViewAugmentation

__all__ = ["ViewAugmentation", "ViewGeometry", "ViewPhotometry", "compose_correspondence"]
