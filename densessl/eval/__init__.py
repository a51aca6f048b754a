"""Downstream evaluation: fine-tune segmentation / detection heads and linear probes from an
encoder, against random and supervised inits, over label fractions and seeds.

The labeled splits a recipe names come from ``densessl.data.labeled`` (every labeled dataset,
its registry and ``build_eval_dataset``). Here: ``inits`` (pretrained / random / supervised;
weights read by ``densessl.models.weights``) →
``segmentation`` / ``detection`` / ``linear_probe`` models → ``finetune`` loops → ``metrics`` →
``report`` (results.json / .md / .png). ``densessl.workflows.experiment`` ties them to pretraining.
"""

from densessl.data.labeled import (
    EVAL_DATASETS,
    LabeledData,
    instances_from_mask,
    register_eval_dataset,
)
from densessl.data.labeled.build import build_eval_dataset
from densessl.eval.inits import supervised_init
from densessl.eval.metrics import DetectionMetrics, SegmentationMetrics
from densessl.models.weights import EncoderInit, load_encoder_file

__all__ = ["EVAL_DATASETS", "DetectionMetrics", "EncoderInit", "LabeledData",
           "SegmentationMetrics", "build_eval_dataset", "instances_from_mask",
           "load_encoder_file", "register_eval_dataset", "supervised_init"]
