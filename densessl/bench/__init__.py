"""``densessl bench``: what training costs and where the time goes.

* :mod:`~densessl.bench.training` — the step itself: a plain MoCo-v2 step against the dense
  objectives (dense + global InfoNCE, + instance contrast with per-class queues), timed in
  interleaved rounds with their FLOPs / TFLOP/s, plus the pair builders, the device
  augmentation and the trainer's wait on data; :func:`run_bench` is the command.
* :mod:`~densessl.bench.data_pipeline` — the data pipeline at real image sizes: decoding,
  each recipe's builder per pair and per DataLoader worker, and the device paste stage.
* :mod:`~densessl.bench.tiles` — ``geotiff_tiles`` windows of a whole 10,980² 13-band
  scene: pairs/s per worker and peak RSS against a scene a sixteenth the size.
* :mod:`~densessl.bench.queues` — :class:`~densessl.losses.PerClassQueue` against the naive
  per-class loop: enqueue, then the negatives' log-sum-exp, with rings filling and full.
"""

from densessl.bench.training import run_bench

__all__ = ["run_bench"]
