"""The levels every backbone returns: ``c2..c5``, the outputs at input strides 4, 8, 16 and 32.

The FPN, the dense head, RoIAlign (stride ``2^K`` for ``pK`` / ``cK``) and the linear probe
read these levels; a backbone entry (:mod:`densessl.models.backbones`) is only valid when it
has all four.
"""

from __future__ import annotations

LEVELS = ("c2", "c3", "c4", "c5")
#: the input stride of each level
LEVEL_STRIDES = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}
