"""Contrastive losses: functional InfoNCE, MoCo queue, dense and global objectives."""

from densessl.losses.dense_contrast import DenseContrast, PerClassDenseContrast, sample_cells
from densessl.losses.functional import contrastive_logits, info_nce, info_nce_from_logits
from densessl.losses.global_contrast import GlobalContrast
from densessl.losses.instance_contrast import InstanceContrast, LevelwiseInstanceContrast
from densessl.losses.per_class_queue import PerClassQueue
from densessl.losses.queue import MoCoQueue

__all__ = [
    "DenseContrast",
    "GlobalContrast",
    "InstanceContrast",
    "LevelwiseInstanceContrast",
    "MoCoQueue",
    "PerClassDenseContrast",
    "PerClassQueue",
    "contrastive_logits",
    "info_nce",
    "info_nce_from_logits",
    "sample_cells",
]
