"""Every labeled dataset, in one place: what a labeled dataset hands to fine-tuning
(:class:`LabeledData`), their registry, and one module per dataset.

* :mod:`~densessl.data.labeled.base`: the contract (:class:`LabeledData`, :data:`TASK_KEYS`),
  the registry (``@register_eval_dataset``) and :func:`instances_from_mask`;
* :mod:`~densessl.data.labeled.build`: :func:`build_eval_dataset` (what ``finetune.dataset``
  names; importing it registers every dataset below);
* a user's own labels: ``mask_folder`` (image + mask folders), ``coco`` (COCO JSON),
  ``geotiff_masks`` (mask rasters next to GeoTIFF scenes, also ``geotiff_series_masks``);
* the built-in sets: ``pidray`` (PIDray format, or its synthetic stand-in), ``xbd`` (with the
  xView2 score, :mod:`~densessl.data.labeled.xview2`), ``noisy-seg`` and ``synthetic``.

The pretraining sources that read the same files (PIDray bags, xBD pairs, noisy-seg scenes)
stay in :mod:`densessl.data`; a labeled module reads through them. Adding a labeled dataset:
``docs/extending.md``.
"""

from densessl.data.labeled.base import (
    EVAL_DATASETS,
    NEEDS_PATH,
    TASK_KEYS,
    LabeledData,
    instances_from_mask,
    register_eval_dataset,
)

__all__ = ["EVAL_DATASETS", "NEEDS_PATH", "TASK_KEYS", "LabeledData", "instances_from_mask",
           "register_eval_dataset"]
