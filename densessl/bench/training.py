"""``densessl bench``: what the dense objectives cost over a plain MoCo-v2 step, and where the
time goes (builders, augmentation, waiting on data).

All step configurations share one backbone, image size, batch and pre-made views, so the ratios
measure the objectives alone: (1) a plain MoCo-v2 step assembled from lightly's parts
(``MoCoProjectionHead``, ``NTXentLoss`` with a memory bank, ``update_momentum``); (2) our dense
objective (dense + global InfoNCE with MoCo queues); (3) dense + instance contrast with per-class
queues (and (3) with RoIAlign from p3). Queues start full; the configurations are timed in
interleaved rounds (median reported) with their model FLOPs, achieved TFLOP/s and, when the
device's peak is known, model FLOP utilisation. With the builders, the data pipeline at real
image sizes too (:mod:`densessl.bench.data_pipeline`).
"""

from __future__ import annotations

import copy
import glob
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from densessl.bench.queues import compare_queues, synchronize
from densessl.contract import add_random_instances
from densessl.recipe import Recipe, load_recipe, packaged_recipe


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak on GPU, sampled resident set size on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_bytes = device, 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = self._rss()
            self._peak, self._stop = self._base, threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = self._peak - self._base


#: queue sizes of configuration (3), per class: those of recipes/xray_segloc.yaml
PER_CLASS_QUEUES = {"dense_queue_size": 512, "instance_queue_size": 256}  # as recorded


def per_class_loss(**instance) -> dict:
    """The ``loss`` settings of configurations (2) and (3): dense + instance contrast with
    per-class queues of :data:`PER_CLASS_QUEUES` (``instance``: more instance settings)."""
    return {"queue": "per_class", "num_classes": BENCH_CLASSES,
            "dense": {"queue_size": PER_CLASS_QUEUES["dense_queue_size"]},
            "instance": {"weight": 1.0, "queue_size": PER_CLASS_QUEUES["instance_queue_size"],
                         **instance}}
#: class ids 0..BENCH_CLASSES-1 in the synthetic boxes and class maps of make_pair_batch
BENCH_CLASSES = 12
#: issue #7's GPU setting, the step the real-size data pipeline feeds (ResNet-50, 224-px views)
REAL_SETTING = {"backbone": "resnet50", "image_size": 224}


def bench_recipe(backbone: str, image_size: int, batch_size: int, **loss) -> Recipe:
    """The benchmark's recipe; ``loss``: its ``loss`` section (objective sections by name,
    e.g. ``instance={"weight": 1.0}``, ``global_=...``; shared ``queue``, ``robust``)."""
    return load_recipe({
        "name": "bench",
        "data": {"image_size": int(image_size * 1.25), "options": {"num_images": batch_size}},
        "augment": {"view_size": image_size},
        "model": {"backbone": backbone},
        "loss": loss,
        "train": {"batch_size": batch_size},
    })


def source_batch(recipe: Recipe, device: torch.device, cell_alignment: str | None = None):
    """One collated SourceBatch of the recipe's builder on ``device``, and the recipe's view
    augmentation (moved there too), its grid on the cells of the recipe's backbone
    (``cell_alignment``; None: asked of that backbone)."""
    from densessl.build import backbone_cell_alignment, build_augmentation, build_pair_builder
    from densessl.pairs import collate_pairs

    builder = build_pair_builder(recipe)
    source = collate_pairs([builder[i] for i in range(recipe.train.batch_size)]).to(device)
    if cell_alignment is None:
        cell_alignment = backbone_cell_alignment(recipe)
    augment = build_augmentation(recipe, recipe.model.dense_stride,
                                 cell_alignment=cell_alignment)
    return source, augment.to(device)


def make_pair_batch(recipe: Recipe, device: torch.device, with_instances: bool = False,
                    cell_alignment: str | None = None, channels_last: bool = False):
    """One augmented PairBatch on ``device`` (optionally with random boxes and class maps, so the
    instance objective has work to do, and views in ``channels_last`` memory format);
    ``cell_alignment`` as :func:`source_batch`."""
    source, augment = source_batch(recipe, device, cell_alignment)
    batch = augment(source)
    if channels_last:
        batch.view_a = batch.view_a.contiguous(memory_format=torch.channels_last)
        batch.view_b = batch.view_b.contiguous(memory_format=torch.channels_last)
    if with_instances:
        add_random_instances(batch, recipe.augment.view_size, BENCH_CLASSES)
    return batch


def moco_v2_step_fn(recipe: Recipe, device: torch.device) -> tuple[Callable, nn.Module]:
    """A plain MoCo-v2 step from lightly's parts, on our backbone (same weights layout)."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    from densessl.models.backbones import build_backbone

    backbone = build_backbone(recipe.model.backbone, recipe.data.channels)
    online = nn.ModuleDict({
        "backbone": backbone,
        "head": MoCoProjectionHead(backbone.channels["c5"], 512, 128),
    }).to(device)
    momentum = copy.deepcopy(online)
    deactivate_requires_grad(momentum)
    criterion = NTXentLoss(temperature=0.2, memory_bank_size=(4096, 128))
    optimizer = torch.optim.SGD(online.parameters(), lr=0.03, momentum=0.9)

    def embed(model, x):
        return model["head"](model["backbone"](x)["c5"].mean(dim=(2, 3)))

    def step(batch):
        update_momentum(online, momentum, 0.99)
        query = embed(online, batch.view_a)
        with torch.no_grad():
            key = embed(momentum, batch.view_b)
        loss = criterion(query, key)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step, online


def fill_queues(module: nn.Module) -> None:
    """Fill every queue with random unit keys (every class ring too), so a few timed steps
    measure the steady state; lightly's memory bank likewise starts full of random keys."""
    from densessl.losses import MoCoQueue, PerClassQueue

    for queue in module.modules():
        if isinstance(queue, MoCoQueue) and queue.size:
            keys = torch.randn(queue.size, queue.dim, device=queue.keys.device)
            labels = (torch.full((queue.size,), -1, device=keys.device)
                      if queue.with_labels else None)
            queue.enqueue(nn.functional.normalize(keys, dim=1), labels)
        elif isinstance(queue, PerClassQueue) and queue.size:
            labels = queue.ring_labels.repeat_interleave(queue.size)
            keys = torch.randn(labels.shape[0], queue.dim, device=labels.device)
            queue.enqueue(nn.functional.normalize(keys, dim=1), labels)


def densessl_step_fn(recipe: Recipe, device: torch.device) -> tuple[Callable, nn.Module]:
    from densessl.methods import DensePretraining

    task = DensePretraining(recipe).to(device)
    fill_queues(task)
    optimizer = torch.optim.SGD(task.model.online.parameters(), lr=0.03, momentum=0.9)

    def step(batch):
        task.model.update(0.99)
        loss, _ = task.compute_losses(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step, task


def autocast_for(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def warm_up(step: Callable, batch, warmup: int, device: torch.device, precision: str) -> float:
    """Run the first steps (they allocate gradients and optimiser state); peak MB."""
    with PeakMemory(device) as memory, autocast_for(device, precision):
        for _ in range(max(warmup, 1)):
            loss = step(batch)
        float(loss.detach())
    return round(memory.peak_bytes / 2**20, 1)


def time_interleaved(steps_by_name: dict[str, Callable], batch, steps: int, rounds: int,
                     device: torch.device, precision: str) -> dict[str, dict]:
    """Time ``steps`` steps of each configuration in turn, ``rounds`` times over, and keep each
    one's median round: on a shared machine the load drifts, and timing the configurations
    one after the other would charge the drift to whichever ran during it."""
    per_step: dict[str, list[float]] = {name: [] for name in steps_by_name}
    losses: dict[str, float] = {}
    with autocast_for(device, precision):
        for _ in range(rounds):
            for name, step in steps_by_name.items():
                synchronize(device)
                start = time.perf_counter()
                for _ in range(steps):
                    loss = step(batch)
                losses[name] = float(loss.detach())  # one sync per round, none per step
                per_step[name].append((time.perf_counter() - start) / steps)
    results = {}
    for name, times in per_step.items():
        median = sorted(times)[len(times) // 2]
        results[name] = {"pairs_per_s": round(batch.batch_size / median, 2),
                         "step_ms": round(1000 * median, 2),
                         "step_ms_rounds": [round(1000 * t, 1) for t in times],
                         "final_loss": round(losses[name], 4)}
    return results


def bench_builders(samples: int = 32) -> dict:
    """Pairs/s of each recipe's pair builder in one process (= per DataLoader worker)."""
    from densessl.build import build_pair_builder

    results = {}
    root = packaged_recipe("demo").parent  # found in a wheel install too
    for path in sorted(glob.glob(str(root / "*.yaml"))):
        name = Path(path).stem
        try:
            recipe = load_recipe(path)
            builder = build_pair_builder(recipe)
            builder[0]  # first sample may build caches (segment bank, statistics)
            count = min(samples, len(builder))
            start = time.perf_counter()
            for i in range(count):
                builder[i % len(builder)]
            results[name] = {"builder": recipe.pairs.builder,
                             "pairs_per_s_per_worker": round(count / (time.perf_counter()
                                                                      - start), 1)}
        except Exception as exc:  # a broken recipe must not hide the other figures
            results[name] = {"builder": None, "error": f"{type(exc).__name__}: {exc}"}
    return results


def bench_data_wait(steps: int = 20) -> dict:
    """A short real pretraining run of the demo recipe with its DataLoader workers."""
    from densessl.workflows.pretraining import pretrain

    demo = packaged_recipe("demo")
    with tempfile.TemporaryDirectory() as out:
        metrics = pretrain(demo, out, overrides=[f"train.max_steps={steps}"], progress=False)
    return {k: metrics[k] for k in ("steps", "pairs_per_s", "data_wait_fraction")}


#: dense bf16 tensor-core peaks (TFLOP/s) by device name, for model FLOP utilisation; any
#: other device or precision needs ``--peak-tflops``
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def peak_tflops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def count_flops(step: Callable, batch, device: torch.device, precision: str) -> float:
    """FLOPs of one training step (forward and backward matrix products and convolutions, as
    PyTorch's FlopCounterMode counts them; RoIAlign and elementwise work are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, autocast_for(device, precision):
        step(batch)
    return float(counter.get_total_flops())


def profile_steps(step: Callable, batch, device: torch.device, precision: str, out: Path,
                  name: str, steps: int = 2) -> None:
    """A torch.profiler trace (open in chrome://tracing or Perfetto) and the top operators."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if device.type == "cuda" else [])
    with profile(activities=activities) as prof, autocast_for(device, precision):
        for _ in range(steps):
            step(batch)
        synchronize(device)
    out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out / f"{name}.trace.json"))
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25)
    from densessl.io import write_text

    write_text(out / f"{name}.top_ops.txt", table + "\n")


def real_setting_step_ms(device: torch.device, batch_size: int, precision: str,
                         channels_last: bool, rounds: int = 3) -> float:
    """Median step time (ms) of configuration (3) at :data:`REAL_SETTING`: dense + instance
    contrast with per-class queues on ResNet-50 at 224-px views, one step per round."""
    recipe = bench_recipe(REAL_SETTING["backbone"], REAL_SETTING["image_size"], batch_size,
                          **per_class_loss())
    batch = make_pair_batch(recipe, device, with_instances=True, channels_last=channels_last)
    step, module = densessl_step_fn(recipe, device)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    warm_up(step, batch, 1, device, precision)
    timed = time_interleaved({"real": step}, batch, 1, rounds, device, precision)
    return timed["real"]["step_ms"]


def run_bench(backbone: str = "resnet18", image_size: int = 128, batch_size: int = 32,
              steps: int = 3, warmup: int = 2, device: str = "auto", precision: str = "32",
              rounds: int = 3, channels_last: bool = False, builders: bool = True,
              data_wait: bool = True, peak: float | None = None,
              profile_dir: str | Path | None = None, tiles: bool = True,
              tiles_only: bool = False, log: Callable[[str], None] = print) -> dict:
    if tiles_only:  # densessl bench --tiles-only: no model, no device
        from densessl.bench.tiles import bench_geotiff_tiles

        return {"geotiff_tiles": bench_geotiff_tiles(log=log)}
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    torch.manual_seed(0)
    base = bench_recipe(backbone, image_size, batch_size)
    batch = make_pair_batch(base, dev, with_instances=True, channels_last=channels_last)
    configs: dict[str, Callable] = {
        "moco_v2_lightly": lambda: moco_v2_step_fn(base, dev),
        "dense": lambda: densessl_step_fn(base, dev),
    }
    # the dense objective plus DetCon's mask-pooled contrast (densessl/methods/objectives/
    # detcon.py) over the class map's segments: what an objective added through the registry
    # costs on top of the dense step
    detcon = bench_recipe(backbone, image_size, batch_size,
                          detcon={"weight": 1.0, "max_classes": BENCH_CLASSES})
    configs["dense_detcon"] = lambda: densessl_step_fn(detcon, dev)
    # per-class ring sizes of the X-ray SegLoc recipes (14 rings × 512 ≈ the single dense
    # queue's 8,192 keys), so (2) and (3) contrast against about as many negatives
    full = bench_recipe(backbone, image_size, batch_size, **per_class_loss())
    configs["dense_instance_per_class"] = lambda: densessl_step_fn(full, dev)
    # the same with RoIAlign from p3 up: what the stride-4 FPN level costs
    from_p3 = bench_recipe(backbone, image_size, batch_size,
                           **per_class_loss(roi_min_level=3))
    configs["dense_instance_per_class_from_p3"] = lambda: densessl_step_fn(from_p3, dev)
    results: dict = {"device": str(dev), "torch": torch.__version__, "backbone": backbone,
                     "image_size": image_size, "batch_size": batch_size, "precision": precision,
                     "channels_last": channels_last, "threads": torch.get_num_threads(),
                     "timing": f"median of {rounds} interleaved rounds of {steps} steps",
                     "queues": {"moco_v2_lightly": 4096, "dense": base.loss.dense.queue_size,
                                "dense_instance_per_class": PER_CLASS_QUEUES},
                     "steps": {}}
    steps_by_name, memory = {}, {}
    for name, make in configs.items():
        step, module = make()
        if channels_last:
            module.to(memory_format=torch.channels_last)
        memory[name] = warm_up(step, batch, warmup, dev, precision)
        steps_by_name[name] = step
    results["steps"] = time_interleaved(steps_by_name, batch, steps, rounds, dev, precision)
    peak = peak if peak is not None else peak_tflops(dev, precision)
    results["peak_tflops"] = peak
    for name, entry in results["steps"].items():
        entry["peak_memory_mb"] = memory[name]
        flops = count_flops(steps_by_name[name], batch, dev, precision)
        entry["gflop_per_step"] = round(flops / 1e9, 1)
        achieved = flops / (entry["step_ms"] / 1000) / 1e12
        entry["achieved_tflops"] = round(achieved, 3)
        entry["mfu"] = round(achieved / peak, 4) if peak else None
        if profile_dir is not None:
            profile_steps(steps_by_name[name], batch, dev, precision, Path(profile_dir), name)
        log(f"{name}: {entry}")
    del steps_by_name
    reference = results["steps"]["moco_v2_lightly"]["pairs_per_s"]
    for entry in results["steps"].values():
        entry["ratio_to_moco"] = round(entry["pairs_per_s"] / reference, 3)
    results["augmentation"] = bench_augmentation(base, dev)
    log(f"augmentation: {results['augmentation']}")
    results["per_class_queue"] = compare_queues(device=dev)
    log(f"per-class queue (12 classes, K=4096, D=128, batch 256): {results['per_class_queue']}")
    if builders:
        results["builders"] = bench_builders()
        log(f"builders: {results['builders']}")
        # the same builders at real image sizes, against decoding alone, and the device-side
        # cut-paste stage next to this run's training step (same device, same batch)
        from densessl.bench.data_pipeline import bench_real_sizes

        real = bench_real_sizes(dev, batch_size=batch_size, log=log)
        stage = real.get("xray", {}).get("device_stage")
        if stage:
            step_ms = results["steps"]["dense_instance_per_class"]["step_ms"]
            stage["fraction_of_training_step"] = round(stage["ms_per_batch"] / step_ms, 3)
            # the stage prepares 512-px sources for the real setting's step, so compare it
            # with that step too (the same as above when the bench already runs it)
            if (backbone, image_size) == tuple(REAL_SETTING.values()):
                real_ms = step_ms
            else:
                real_ms = real_setting_step_ms(dev, batch_size, precision, channels_last)
            stage["real_setting_step"] = {**REAL_SETTING, "batch_size": batch_size,
                                          "precision": precision, "step_ms": round(real_ms, 1)}
            stage["fraction_of_real_setting_step"] = round(stage["ms_per_batch"] / real_ms, 3)
            log(f"device stage vs training steps: {stage}")
        results["real_sizes"] = real
        if tiles:  # whole-scene windows: pairs/s per worker and memory vs scene size
            from densessl.bench.tiles import bench_geotiff_tiles

            try:
                results["geotiff_tiles"] = bench_geotiff_tiles(log=log)
            except Exception as exc:  # one broken part must not hide the other figures
                results["geotiff_tiles"] = {"error": f"{type(exc).__name__}: {exc}"}
    if data_wait:
        results["data_wait"] = bench_data_wait()
        log(f"data wait: {results['data_wait']}")
    return results


def bench_augmentation(recipe: Recipe, device: torch.device, repeats: int = 5) -> dict:
    """Device-side view augmentation + correspondence throughput."""
    source, augment = source_batch(recipe, device)
    augment(source)
    start = time.perf_counter()
    for _ in range(repeats):
        batch = augment(source)
    float(batch.valid_ab.float().mean())
    elapsed = time.perf_counter() - start
    return {"pairs_per_s": round(repeats * source.batch_size / elapsed, 1)}
