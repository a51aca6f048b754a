"""The pretrain → fine-tune → export pipeline, on top of ``methods`` and ``eval``.

* :mod:`~densessl.workflows.pretraining` — ``densessl pretrain``: runs the Lightning task and
  writes ``encoder.pt`` (+ ``encoder.json``, neck / box head), ``metrics.json`` and checkpoints.
* :mod:`~densessl.workflows.resume` — the output folder (checks, checkpoints, resume state).
* :mod:`~densessl.workflows.experiment` — ``densessl finetune`` / ``densessl run`` (run =
  pretrain + fine-tune every init) and ``results.json`` / the report.
* :mod:`~densessl.workflows.export` — ``densessl export``: torchvision / smp / timm /
  detectron2 weights and the model card.
* :mod:`~densessl.workflows.inspect_pairs` — ``densessl inspect-pairs``: pictures of pairs and
  their correspondences.

Nothing is imported here: each module loads its own (heavy) dependencies when used.
"""
