"""Recipes: validated YAML configuration (pydantic, unknown keys forbidden).

Every user mistake becomes one :class:`RecipeError` line that names the key, what was found and
what was expected, e.g. ``recipe demo.yaml: model.backbon: unknown key (did you mean 'backbone'?
valid keys: backbone, in_channels, ...)``.
"""

from __future__ import annotations

import copy
import difflib
import json
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from densessl.errors import RecipeError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ProvenanceConfig(Section):
    """Per-image provenance filters (PASS-style), read from ``data.manifest``."""

    require: list[Literal["licence", "author", "url"]] = Field(
        [], description="manifest fields every used image must have (e.g. [licence]); images "
        "without them are dropped (or refused, on_missing: error)")
    allow_licences: list[str] | None = Field(
        None, description="keep only images under these licences (SPDX ids or names, e.g. "
        "[CC-BY-4.0, CC0-1.0]); null: any licence")
    exclude_flags: list[str] = Field([], description="drop images whose manifest flag is true, "
                                     "e.g. [contains_people]")
    on_missing: Literal["drop", "error"] = Field(
        "drop", description="an image without a manifest row or a required field: drop it "
        "(counted in metrics.json) or stop with an error")


class DataConfig(Section):
    source: str = Field("synthetic", description="a registered data source: synthetic, "
                        "folder, ... (see densessl.data.registry)")
    path: str | None = Field(None, description="dataset root / folder, when the source reads disk")
    channels: int = Field(3, ge=1)
    image_size: int = Field(96, ge=16, description="side of the source images given to the builder")
    bit_depth: Literal["auto", 8, 10, 12, 14, 16] = Field(
        "auto", description="bits of data per pixel: integer images stored in more than 8 bits "
        "are scaled to [0, 1] by 2**bit_depth - 1 (a 12-bit X-ray in a 16-bit PNG by 4095, "
        "not 65535); auto = what the files declare (PNG sBIT, GeoTIFF NBITS), else the "
        "smallest depth holding the largest value of a sample; resolved at start-up and "
        "written to recipe.yaml. 8-bit files always scale by 255 (densessl.data.bit_depth)")
    options: dict[str, Any] = Field({}, description="keyword options of the data source, e.g. "
                                    "num_images for 'synthetic'")
    skip_bad: bool = Field(False, description="skip unreadable samples with a warning and a count "
                           "in metrics.json instead of failing")
    manifest: str | None = Field(None, description="per-image attribution manifest (CSV with a "
                                 "header, or JSON): file (relative to data.path), licence, "
                                 "author, url, boolean flags; see densessl.data.manifest")
    provenance: ProvenanceConfig = ProvenanceConfig()

    @model_validator(mode="after")
    def _path_needed(self):
        if self.source == "folder" and not self.path:
            raise ValueError("data.path is required when data.source is 'folder'")
        p = self.provenance
        if not self.manifest and (p.require or p.allow_licences is not None or p.exclude_flags):
            raise ValueError("data.provenance filters need data.manifest (a CSV/JSON file with "
                             "one row per image)")
        return self


class PairsConfig(Section):
    builder: str = "same_image"
    options: dict[str, Any] = {}


class GeometryConfig(Section):
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333)
    hflip: float = Field(0.5, ge=0, le=1)
    vflip: float = Field(0.0, ge=0, le=1)
    rotation_degrees: float = Field(0.0, ge=0, le=180)
    rotation_p: float = Field(0.0, ge=0, le=1)

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, value):
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError("expected 0 < min <= max <= 1")
        return value


class PhotometryConfig(Section):
    enabled: bool = True
    jitter_p: float = Field(0.8, ge=0, le=1)
    brightness: float = Field(0.4, ge=0)
    contrast: float = Field(0.4, ge=0)
    saturation: float = Field(0.2, ge=0)
    hue: float = Field(0.1, ge=0, le=0.5)
    grayscale_p: float = Field(0.2, ge=0, le=1)
    blur_p: float = Field(0.5, ge=0, le=1)
    solarize_p: float = Field(0.0, ge=0, le=1)
    non_rgb: Literal["per_channel", "skip"] = "per_channel"


class AugmentConfig(Section):
    view_size: int = Field(64, ge=16)
    geometry: GeometryConfig = GeometryConfig()
    photometry: PhotometryConfig = PhotometryConfig()
    mean: float | list[float] | Literal["auto"] = Field(
        0.5, description="normalisation mean after bit-depth scaling: one number, one per band, "
        "or auto (per-band means over a sample of the pretraining data, nodata excluded, "
        "computed at start-up and written to recipe.yaml; densessl data stats prints them)")
    std: float | list[float] | Literal["auto"] = Field(
        0.25, description="normalisation std: one number, one per band, or auto (as mean)")

    @model_validator(mode="after")
    def _auto_together(self):
        # a computed mean with a typed-in std (or the reverse) rescales bands inconsistently
        if (self.mean == "auto") != (self.std == "auto"):
            raise ValueError("augment.mean and augment.std: set both to auto or neither (got "
                             f"mean {self.mean!r}, std {self.std!r})")
        return self

    def normalisation(self) -> tuple[float | list[float], float | list[float]]:
        """(mean, std) as numbers; auto must have been resolved from the data first
        (densessl.workflows.data_settings)."""
        if self.mean == "auto" or self.std == "auto":
            raise RecipeError("augment.mean / augment.std: auto is not resolved yet; run "
                              "densessl data stats RECIPE and paste its values, or start "
                              "through densessl pretrain / run / finetune, which compute them")
        return self.mean, self.std


class ModelConfig(Section):
    backbone: str = Field("resnet18", description="resnet18, resnet34, resnet50 (torchvision) "
                          "or timm:<name>, any timm CNN with features_only (e.g. "
                          "timm:convnext_atto, timm:efficientnet_b0, timm:regnetx_002)")
    neck: Literal["fpn", "none"] = "fpn"
    dense_stride: Literal[8, 16, 32] = 8
    neck_dim: int = Field(128, ge=8)
    fpn_upsample: Literal["centred", "nearest"] = Field(
        "centred", description="FPN top-down upsampling: centred keeps each cell on the pixel "
        "its feature is centred on, for the backbone's cell alignment (densessl.cells: ResNets "
        "coarse cell j on fine cell 2j, ConvNeXt's patchify cells bilinear "
        "align_corners=False); nearest is torchvision's, which gives odd cells a neighbour's "
        "top-down value")
    dense_dim: int = Field(128, ge=8)
    global_head: bool = True
    global_dim: int = Field(128, ge=8)
    momentum: float = Field(0.99, ge=0, le=1)
    momentum_end: float = Field(1.0, ge=0, le=1)
    key_bn: Literal["batch", "shuffle", "sync", "split"] = Field(
        "batch", description="BatchNorm of the key branch: plain; shuffled across processes "
        "(lightly's batch shuffle, MoCo); SyncBN; or split-BN on one device (with shuffle)")
    split_bn_groups: int = Field(4, ge=1, description="sub-batches for key_bn: split")
    init_weights: str | None = Field(
        None, description="what the backbone starts pretraining from (online and momentum "
        "alike): null = random init; imagenet = torchvision's IMAGENET1K_V1 (resnet18/34/50) or "
        "the timm model's default pretrained weights, read offline (model.weights_file or the "
        "torch hub / Hugging Face cache; never downloaded); or the PATH of an encoder.pt or a "
        "torchvision / timm state dict. A 3-channel first conv is adapted to data.channels "
        "(timm adapt_input_conv). Recorded in encoder.json / metrics.json (init_weights)")
    weights_file: str | None = Field(
        None, description="local file of the ImageNet weights, for model.init_weights: imagenet "
        "and finetune.inits: imagenet (e.g. resnet18-f37072fd.pth, a timm model.safetensors); "
        "null: look in torch.hub.get_dir()/checkpoints (timm: the Hugging Face hub cache)")

    @field_validator("init_weights", "weights_file")
    @classmethod
    def _not_empty(cls, value):
        if value is not None and not value.strip():
            raise ValueError("expected null, imagenet or a file path, got an empty string")
        return value


class ObjectiveConfig(Section):
    """An objective's settings (densessl/methods/objectives): at least its ``weight`` (0 =
    off). Lives here, with the recipe, because the recipe validates it when it is read.

    ``SECTION``: the objective's own section of ``loss`` (``loss.<SECTION>``, as written in a
    recipe). Settings that several objectives share (``loss.queue``, ``loss.num_classes``,
    ``loss.robust``) stay in ``loss`` itself; objectives read them from ``recipe.loss``."""

    SECTION: ClassVar[str | None] = None
    weight: float = Field(0.0, ge=0, description="weight of the objective's term in the "
                          "step's loss (0: off)")

    @classmethod
    def from_loss(cls, loss: LossConfig) -> ObjectiveConfig:
        """This objective's settings in the recipe's ``loss`` section."""
        if cls.SECTION is None:
            raise TypeError(f"{cls.__name__} names no loss section (SECTION)")
        return loss.section(cls.SECTION)


class DenseConfig(ObjectiveConfig):
    """``loss.dense``: pixel (cell) InfoNCE at the exact correspondence
    (densessl/methods/objectives/dense.py)."""

    SECTION: ClassVar[str | None] = "dense"
    weight: float = Field(1.0, ge=0, description="weight of the dense InfoNCE (0: off)")
    temperature: float = Field(0.2, gt=0)
    queue_size: int = Field(8192, ge=0, description="negatives queue length (per class with "
                            "loss.queue: per_class)")
    samples_per_image: int = Field(64, ge=1)
    enqueue_per_image: int = Field(16, ge=0)
    batch_negatives: bool = True
    background: Literal["negative", "own_class", "ignore"] = Field(
        "negative", description="dense cells a class map marks -1 (the bag under pasted "
        "segments): negative = unknown, a negative for every query and every key a negative "
        "for them; own_class = a class with its own ring (no background negatives for "
        "background queries; needs loss.queue: per_class); ignore = neither queries nor keys "
        "(contrast the segments only, as SegLoc/InsLoc do)")


class GlobalConfig(ObjectiveConfig):
    """``loss.global``: MoCo image-level InfoNCE on the global head
    (densessl/methods/objectives/global_.py; needs model.global_head). Python attribute
    ``loss.global_`` (``global`` is a keyword)."""

    SECTION: ClassVar[str | None] = "global"
    weight: float = Field(0.5, ge=0, description="weight of the global InfoNCE (0: off)")
    temperature: float = Field(0.2, gt=0)
    queue_size: int = Field(4096, ge=0)


class InstanceConfig(ObjectiveConfig):
    """``loss.instance``: InsLoc's box-level InfoNCE over the pair's boxes
    (densessl/methods/objectives/instance.py; needs model.neck: fpn)."""

    SECTION: ClassVar[str | None] = "instance"
    weight: float = Field(0.0, ge=0, description="InsLoc instance contrast over the "
                          "pair's boxes (needs model.neck: fpn)")
    temperature: float = Field(0.2, gt=0)
    queue_size: int = Field(4096, ge=1, description="negatives queue length (per class with "
                            "loss.queue: per_class)")
    roi_output_size: int = Field(7, ge=1, description="RoIAlign output side")
    roi_canonical_scale: float = Field(224.0, gt=0, description="box side that maps to FPN "
                                       "level 4 (Lin et al. 2017); lower it for small views")
    roi_min_level: int = Field(2, ge=2, le=5, description="finest FPN level RoIAlign reads "
                               "(boxes below it are pooled there); 3 skips the stride-4 level "
                               "p2, the costliest part of the FPN")
    roi_levels: Literal["by_size", "all"] = Field(
        "by_size", description="by_size: each box pooled once, on the level its size selects "
        "(lean); all: every box pooled on every level p{roi_min_level}..p5, one InfoNCE and "
        "one queue per level, losses averaged (InsLoc)")
    roi_head: Literal["mlp", "conv"] = Field(
        "mlp", description="instance head: mlp (Linear-ReLU-Linear, no BatchNorm); conv: "
        "InsLoc's 4conv-1fc box head with BatchNorm (torchvision's FastRCNNConvFCHead, the "
        "detector's box head) and a projector; conv needs roi_output_size >= 2")
    roi_head_fc_dim: int = Field(1024, ge=8, description="fc width of the conv head "
                                 "(InsLoc and torchvision: 1024)")
    box_jitter: bool = Field(False, description="jitter view A's (query) boxes: a random box "
                             "with IoU > box_jitter_min_iou to the instance's box, inside the "
                             "view (InsLoc's localisation pretext)")
    box_jitter_min_iou: float = Field(0.5, ge=0, lt=1, description="jittered query boxes keep "
                                      "IoU > this with the true box (InsLoc: 0.5)")
    box_jitter_levels: Literal["coarsest", "all"] = Field(
        "coarsest", description="with roi_levels: all, the levels that pool the jittered query "
        "box: coarsest (p5 only, InsLoc) or all; the others pool the true box")

    @property
    def levels(self) -> list[str]:
        """The FPN levels RoIAlign reads: ``p{roi_min_level}..p5``."""
        return [f"p{k}" for k in range(self.roi_min_level, 6)]

    @model_validator(mode="after")
    def _instance_options(self):
        if self.roi_head == "conv" and self.roi_output_size < 2:
            raise ValueError(f"loss.instance.roi_head: conv needs loss.instance.roi_output_size"
                             f" >= 2 (its BatchNorm needs 2 values per channel from one box), "
                             f"got {self.roi_output_size}")
        if self.box_jitter and self.box_jitter_levels == "coarsest" and \
                self.roi_levels == "by_size":
            raise ValueError("loss.instance.box_jitter_levels: coarsest needs "
                             "loss.instance.roi_levels: all (with by_size each box is pooled "
                             "on one level); set box_jitter_levels: all to jitter by_size "
                             "boxes")
        return self


class RobustConfig(Section):
    """``loss.robust``: robust positives (densessl.losses.robust), one setting for every
    objective whose positives can be wrong: the dense and the instance InfoNCE."""

    kind: Literal["none", "rince", "truncate", "rank"] = Field(
        "none", description="robust positives in the dense and instance InfoNCE "
        "(densessl.losses.robust): none = InfoNCE; rince = Robust InfoNCE (Chuang et al., "
        "CVPR 2022), -e^(q s+)/q + (lambda (e^(s+) + sum e^(s-)))^q/q with s = cos/T; "
        "truncate = loss truncation (Kang & Hashimoto 2020): drop the truncate_fraction of "
        "query cells / boxes with the lowest positive similarity in the batch; rank = drop the "
        "queries whose positive is beaten by more than rank_threshold of their own allowed "
        "negatives (scale-free, follows the noise present)")
    rince_q: float = Field(0.5, gt=0, le=1, description="RINCE q in (0, 1]: -> 0 is InfoNCE, "
                           "1 the most robust (down-weights dissimilar positives most)")
    rince_lambda: float = Field(0.01, gt=0, le=1, description="RINCE lambda in (0, 1]: weight "
                                "of the negatives' density (paper: 0.01-0.025)")
    truncate_fraction: float = Field(0.1, ge=0, lt=1, description="truncate: fraction in "
                                     "[0, 1) of the batch's weighted queries dropped once "
                                     "warmed up")
    truncate_warmup_steps: int = Field(0, ge=0, description="truncate: steps over which the "
                                       "dropped fraction ramps linearly from 0 (0: at once); "
                                       "rank: the threshold ramps from 1 down to rank_threshold")
    rank_threshold: float = Field(0.5, gt=0, lt=1, description="rank: a query cell / box gets "
                                  "weight 0 when more than this fraction of its allowed "
                                  "negatives are more similar to it than its positive")


class DetConConfig(ObjectiveConfig):
    """``loss.detcon``: DetCon's mask-pooled contrast (Hénaff et al. 2021;
    densessl/methods/objectives/detcon.py). Segments are the classes of view A's class map:
    each image's cells of one class are average-pooled in view A (online) and, at the same
    scene points (``grid_ab``), in view B (momentum); InfoNCE across the segments of the batch.
    """

    SECTION: ClassVar[str | None] = "detcon"
    weight: float = Field(0.0, ge=0, description="weight of the mask-pooled InfoNCE (0: off)")
    temperature: float = Field(0.1, gt=0, description="InfoNCE temperature (DetCon: 0.1)")
    max_classes: int | None = Field(
        None, ge=1, description="class ids 0..max_classes-1 are segments (larger ids are left "
        "out); null: loss.num_classes. Fixes the segment slots per image, so shapes never "
        "depend on the data")
    background: Literal["segment", "ignore"] = Field(
        "ignore", description="cells the class map marks -1 (the bag under pasted segments): "
        "segment = one more segment per image; ignore = in no segment")
    min_cells: int = Field(1, ge=1, description="a segment takes part when it has at least "
                           "this many valid cells in view A")


class LossConfig(Section):
    """``loss``: one section per objective (``dense``, ``global``, ``instance``, ``detcon``)
    and the settings they share: ``queue`` and ``num_classes`` (the class-id setup of the
    dense and instance queues; DetCon's segment slots default to num_classes) and ``robust``
    (the dense and instance InfoNCE's robust positives)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True,
                              serialize_by_alias=True)

    queue: Literal["single", "per_class"] = Field(
        "single", description="per_class: one ring per class (SegLoc), in the dense and the "
        "instance objective; a query's negatives never share its class; "
        "loss.dense.queue_size / loss.instance.queue_size are then per class")
    num_classes: int | None = Field(
        None, ge=1, description="class ids 0..num_classes-1 for per-class queues (-1 = "
        "unknown) and DetCon's segments; null: from the data, the largest id the pair builder "
        "emits (label_ids()) + 1, resolved when the builder is built and written to "
        "recipe.yaml / metrics.json")
    robust: RobustConfig = Field(RobustConfig(), description="robust positives of the dense "
                                 "and instance InfoNCE (loss.robust.kind)")
    dense: DenseConfig = Field(DenseConfig(), description="the dense (cell) contrast")
    global_: GlobalConfig = Field(GlobalConfig(), alias="global",
                                  description="the global (image) contrast")
    instance: InstanceConfig = Field(InstanceConfig(), description="InsLoc's instance contrast "
                                     "(loss.instance.weight > 0 turns it on)")
    detcon: DetConConfig = Field(DetConConfig(), description="DetCon's mask-pooled contrast "
                                 "(loss.detcon.weight > 0 turns it on)")

    def section(self, name: str) -> ObjectiveConfig:
        """Objective section ``name`` as a recipe writes it (``global`` is ``global_``)."""
        return getattr(self, "global_" if name == "global" else name)

    @model_validator(mode="after")
    def _background_needs_classes(self):
        if self.dense.background == "own_class" and self.queue != "per_class":
            raise ValueError("loss.dense.background: own_class needs loss.queue: per_class (one "
                             "queue has no class to give the background)")
        return self


#: The flat ``loss.*`` keys of recipes before the objectives had their own sections (issue #28)
#: → their places now: each section's former field → flat-key table (the ``FLAT`` tables of
#: the dense, global and instance configs and the robust fields'). ``loss.queue`` and
#: ``loss.num_classes`` did not move.
_FORMER_FLAT: dict[str, dict[str, str]] = {
    "dense": {"weight": "dense_weight", "temperature": "temperature",
              "queue_size": "dense_queue_size", "samples_per_image": "samples_per_image",
              "enqueue_per_image": "enqueue_per_image", "batch_negatives": "batch_negatives",
              "background": "background"},
    "global": {"weight": "global_weight", "temperature": "temperature",
               "queue_size": "global_queue_size"},
    "instance": {"weight": "instance_weight", "temperature": "temperature",
                 "queue_size": "instance_queue_size", "roi_output_size": "roi_output_size",
                 "roi_canonical_scale": "roi_canonical_scale", "roi_min_level": "roi_min_level",
                 "roi_levels": "roi_levels", "roi_head": "roi_head",
                 "roi_head_fc_dim": "roi_head_fc_dim", "box_jitter": "box_jitter",
                 "box_jitter_min_iou": "box_jitter_min_iou",
                 "box_jitter_levels": "box_jitter_levels"},
    "robust": {"kind": "robust", "rince_q": "rince_q", "rince_lambda": "rince_lambda",
               "truncate_fraction": "truncate_fraction",
               "truncate_warmup_steps": "truncate_warmup_steps",
               "rank_threshold": "rank_threshold"},
}

#: former flat key → its new places (``section.field``, under ``loss``); ``temperature`` is
#: in three
MOVED_LOSS_KEYS: dict[str, tuple[str, ...]] = {}
for _section, _table in _FORMER_FLAT.items():
    for _field, _flat in _table.items():
        MOVED_LOSS_KEYS[_flat] = (*MOVED_LOSS_KEYS.get(_flat, ()), f"{_section}.{_field}")
del _section, _table, _field, _flat


def _moved_keys(loss: dict) -> list[str]:
    """The former flat keys in the raw ``loss`` mapping (``robust`` only as a plain value:
    a mapping is the new section)."""
    return [k for k in loss if k in MOVED_LOSS_KEYS
            and not (k == "robust" and isinstance(loss[k], dict))]


def moved_key_message(key: str) -> str:
    """``loss.dense_weight moved to loss.dense.weight`` (every place, for a key that split)."""
    places = [f"loss.{p}" for p in MOVED_LOSS_KEYS[key]]
    where = places[0] if len(places) == 1 else \
        f"{', '.join(places[:-1])} and {places[-1]} (one value each)"
    return f"loss.{key} moved to {where}"


def migrate_flat_loss(data: dict) -> dict:
    """A copy of the raw recipe ``data`` with the former flat ``loss.*`` keys moved into their
    sections (a key that split, ``temperature``, sets every place): how a recipe saved before
    the move (a checkpoint's, a run's recipe.yaml) is read. The mapping is exact, so the
    migrated recipe trains what the saved one did. A value the new sections already hold is
    kept."""
    loss = data.get("loss") if isinstance(data, dict) else None
    if not isinstance(loss, dict) or not _moved_keys(loss):
        return data
    data = copy.deepcopy(data)
    loss = data["loss"]
    for key in _moved_keys(loss):
        value = loss.pop(key)
        for place in MOVED_LOSS_KEYS[key]:
            section, field = place.split(".")
            node = loss.setdefault(section, {})
            if isinstance(node, dict):
                node.setdefault(field, value)
    return data


class TrainConfig(Section):
    batch_size: int = Field(16, ge=1)
    max_steps: int = Field(100, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(0, ge=0)
    num_workers: int = Field(2, ge=0)
    accelerator: str = "auto"
    devices: int | str = 1
    precision: str = "32-true"
    log_every: int = Field(10, ge=1)
    channels_last: bool = False
    strategy: str = Field("auto", description="Lightning strategy, e.g. ddp for several devices")
    num_nodes: int = Field(1, ge=1)
    compile: bool = Field(False, description="torch.compile the online encoder")
    checkpoint_every: int = Field(0, ge=0, description="save checkpoints/last.ckpt, encoder.pt "
                                  "and metrics.json (all of one step) every N steps; 0: by "
                                  "time only")
    checkpoint_minutes: float = Field(10.0, ge=0, description="also save every this many "
                                      "minutes (checked every log_every steps); 0: off")
    on_nonfinite: Literal["stop", "skip_step"] = Field(
        "stop", description="a non-finite loss or gradient: stop the run (checked every "
        "log_every steps, no per-step sync) or skip that step's update (one host read per "
        "step); skipped steps are counted in metrics.json")


class DropChannelsConfig(Section):
    """Encoder-output channels zeroed while fine-tuning (densessl probe-artifacts' mitigation)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True,
                              serialize_by_alias=True)
    from_: str = Field(alias="from", description="an artifacts.json written by densessl "
                       "probe-artifacts")
    top_k: int = Field(ge=1, description="zero this many top-ranked channels")


class SpuriousConfig(Section):
    """A controlled spurious correlation for the fine-tuning data (densessl/eval/spurious.py):
    the artifact on train images that contain ``class_id``, on test images that do not."""

    artifact: str = Field(description="text, logo, border, or an RGBA .png")
    class_id: int = Field(ge=1, description="the class the artifact co-occurs with in train")
    rate: float = Field(1.0, gt=0, le=1, description="probability that an eligible image is "
                        "stamped")


class FinetuneAugment(Section):
    """Augmentation of the fine-tuning train split (albumentations; densessl/eval/augmentation.py):
    image, class mask, boxes and instance masks move together. Probabilities in [0, 1]."""

    hflip: float = Field(0.5, ge=0, le=1, description="horizontal flip probability")
    vflip: float = Field(0.0, ge=0, le=1, description="vertical flip probability")
    rotate90: float = Field(0.0, ge=0, le=1, description="probability of a random multiple of "
                            "90 degrees (overhead / X-ray imagery has no up)")
    crop_scale: tuple[float, float] = Field(
        (1.0, 1.0), description="random resized crop: area fraction kept, [min, max] in (0, 1], "
        "resized back to finetune.image_size; [1, 1]: off")
    photometric: float = Field(0.0, ge=0, le=1, description="probability of a photometric "
                               "jitter: brightness / contrast for 3 channels, a gain per band "
                               "otherwise")

    @field_validator("crop_scale")
    @classmethod
    def _crop_scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"expected 0 < min <= max <= 1, got {list(v)}")
        return v


#: metrics ``finetune.primary`` may name: dense tasks (segmentation, linear_probe) and detection
DENSE_METRICS = ("mIoU", "fg_mIoU")
DETECTION_METRICS = ("box_AP50", "box_mAP", "box_AP75", "box_AR100", "mask_mAP")


def task_key(task: str, arch: str | None, fraction: float) -> str:
    """A fine-tuning configuration's name in results.json, e.g. ``segmentation/fpn@10%``
    (:func:`densessl.eval.finetune.task_runs`)."""
    return f"{task}{'/' + arch if arch else ''}@{100 * fraction:g}%"


def split_task_key(key: str) -> tuple[str, float]:
    """``segmentation/fpn@10%`` → (``segmentation/fpn``, 10.0); no ``@``: 100 %."""
    base, _, pct = key.partition("@")
    return base, float(pct.rstrip("%")) if pct else 100.0


def resolve_primary(spec: str | None, keys: list[str]) -> tuple[str, str]:
    """(task key, metric) that ``finetune.primary`` names among the task ``keys``.

    ``spec`` is ``TASK[/ARCH][@PCT%][/METRIC]``, e.g. ``linear_probe/mIoU``,
    ``segmentation/fpn@10%/mIoU``, ``detection/faster_rcnn/box_AP50``. No arch: the task's first;
    no fraction: the largest listed (100 % when listed); no metric: mIoU (box_AP50 for
    detection). None: the first linear probe, else the first task, so resolved. Raises
    ValueError naming the valid choices."""
    if not keys:
        raise ValueError("no fine-tuning tasks")
    bases = list(dict.fromkeys(split_task_key(k)[0] for k in keys))
    fractions = {b: [split_task_key(k)[1] for k in keys if split_task_key(k)[0] == b]
                 for b in bases}
    pcts = sorted({p for ps in fractions.values() for p in ps})
    valid = (f"valid: {', '.join(bases)}, each optionally @<fraction> of "
             f"{', '.join(f'{p:g}%' for p in pcts)} (default: the largest), then /<metric>: "
             f"{', '.join(DENSE_METRICS)} (detection: {', '.join(DETECTION_METRICS)}), e.g. "
             f"{bases[0]}/{_default_metric(bases[0])}")
    pct = metric = None
    if spec is None:
        base = next((b for b in bases if b.startswith("linear_probe")), bases[0])
    else:
        parts = spec.split("/")
        names = []
        for part in parts:
            name, at, text = part.partition("@")
            if at:
                if pct is not None or not text.endswith("%"):
                    raise ValueError(f"{spec!r}: write the fraction once, as @<percent>% "
                                     f"after the task; {valid}")
                try:
                    pct = float(text[:-1])
                except ValueError:
                    raise ValueError(f"{spec!r}: {text!r} is not a percentage; {valid}") from None
            names.append(name)
        if "/".join(names[:2]) in bases:
            base, rest = "/".join(names[:2]), names[2:]
        elif names[0] in bases:
            base, rest = names[0], names[1:]
        else:  # no arch named: the task's first one
            base = next((b for b in bases if b.split("/")[0] == names[0]), None)
            rest = names[1:]
            if base is None or len(rest) > 1:
                raise ValueError(f"{spec!r}: no task {'/'.join(names[:2])!r}; {valid}")
        if len(rest) > 1 or (rest and "@" in parts[-1]):
            raise ValueError(f"{spec!r}: expected TASK[/ARCH][@PCT%][/METRIC]; {valid}")
        metric = rest[0] if rest else None
    if metric is None:
        metric = _default_metric(base)
    allowed = DETECTION_METRICS if base.startswith("detection") else DENSE_METRICS
    if metric not in allowed or (metric == "mask_mAP" and "mask_rcnn" not in base):
        raise ValueError(f"{spec!r}: {base} has no metric {metric!r}; {valid}")
    if pct is None:
        pct = max(fractions[base])
    match = [k for k in keys if split_task_key(k)[0] == base and
             abs(split_task_key(k)[1] - pct) < 1e-9]
    if not match:
        raise ValueError(f"{spec!r}: {base} is not run at {pct:g}%; {valid}")
    return match[0], metric


def _default_metric(base: str) -> str:
    return "box_AP50" if base.startswith("detection") else "mIoU"


#: the inits finetune.inits may name besides finetune.controls
BUILTIN_INITS = ("pretrained", "label_free", "random", "supervised", "imagenet")


class FinetuneConfig(Section):
    """Downstream evaluation (``densessl finetune`` / ``densessl run``), see densessl/eval."""

    dataset: str = Field("synthetic", description="a registered labeled dataset "
                         "(densessl.data.labeled.EVAL_DATASETS)")
    path: str | None = Field(None, description="dataset root, when the dataset reads disk")
    options: dict[str, Any] = Field({}, description="keyword options of the labeled dataset")
    image_size: int = Field(64, ge=32, description="side of the fine-tuning images")
    augment: FinetuneAugment = Field(default_factory=FinetuneAugment,
                                     description="train-split augmentation (not the probe's)")
    spurious: SpuriousConfig | None = Field(
        None, description="artifact stamped with one class in train, without it in test "
        "(does the encoder let the model take the shortcut?); null: off")
    tasks: list[Literal["segmentation", "detection", "linear_probe"]] = ["segmentation"]
    segmentation_archs: list[Literal["unet", "fpn", "deeplabv3plus"]] = ["fpn"]
    detection_archs: list[Literal["faster_rcnn", "mask_rcnn"]] = ["faster_rcnn"]
    inits: list[str] = Field(
        ["pretrained", "random"], description="encoders compared: pretrained (this recipe), "
        "label_free (the same pretraining with label_free_set applied: the control that reads "
        "no class labels), random, supervised (the ceiling), imagenet (torchvision / timm "
        "ImageNet weights, read offline from model.weights_file or the torch hub / Hugging "
        "Face cache: the encoder a practitioner would otherwise start from), or the name of "
        "one of finetune.controls")
    label_free_set: dict[str, Any] = Field(
        {"loss.queue": "single"}, description="dotted recipe overrides that turn this "
        "pretraining into the label-free control (same budget, no class labels)")
    controls: dict[str, dict[str, Any]] = Field(
        {}, description="named pretraining controls: NAME: {dotted.key: value, ...}; a NAME "
        "listed in finetune.inits pretrains this recipe with those overrides (same budget, "
        "same pretraining seeds) and is scored like pretrained, e.g. a control that reads no "
        "masks and no class ids")
    pretrain_seeds: list[int] | None = Field(
        None, description="densessl run: pretrain once per seed (one seed, or as many as "
        "finetune.seeds, zipped with them; with one finetune.seed, that seed for every run), "
        "so the std, intervals and paired differences cover pretraining runs; null: one "
        "pretraining at the recipe seed")
    primary: str | None = Field(
        None, description="the metric the protocol is judged on: TASK[/ARCH][@PCT%][/METRIC], "
        "e.g. linear_probe/mIoU, segmentation/fpn@10%/mIoU, detection/faster_rcnn/box_AP50; no "
        "fraction: the largest of label_fractions; null: the first linear probe, else the first "
        "task, at the largest fraction")
    label_fractions: list[float] = [1.0]
    seeds: list[int] = [0]
    steps: int = Field(50, ge=1, description="optimiser steps per segmentation / probe run")
    detection_steps: int = Field(50, ge=1, description="optimiser steps per detection run")
    supervised_steps: int = Field(100, ge=1, description="steps of the supervised init")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the heads")
    encoder_lr_mult: float = Field(0.1, ge=0, description="encoder lr = lr x this, for inits "
                                   "with weights (a random encoder trains at lr: it has "
                                   "nothing to keep)")
    class_balance: Literal["none", "balanced"] = Field(
        "none", description="per-pixel loss weights: balanced = n_pixels / (K n_c) over the "
        "train subset's classes (segmentation and probe)")
    weight_decay: float = Field(1e-4, ge=0)
    # 500 steps at lr 0.1 bring the probe's train loss near its optimum (tests/test_linear_probe
    # .py); 200 at 0.01 stopped above the loss of predicting the class frequencies
    probe_steps: int = Field(500, ge=1, description="steps of the linear probe on cached "
                             "features")
    probe_lr: float = Field(0.1, gt=0, description="AdamW learning rate of the linear probe")
    probe_batch_size: int = Field(2048, ge=2, description="pixels per linear-probe step")
    probe_pixels_per_image: int = Field(256, ge=1, description="labelled pixels drawn from "
                                        "each train image as the probe's training rows")
    probe_levels: list[Literal["c2", "c3", "c4", "c5"]] = Field(
        ["c2", "c3", "c4", "c5"], description="backbone stages in the probe's hypercolumn")
    probe_recompute_bn: Literal["random", "all", "none"] = Field(
        "random", description="re-estimate the encoder's BatchNorm statistics on the train "
        "images before the probe: for the random init only, for every init, or never")
    detection_neck: bool | Literal["auto"] = Field(
        "auto", description="initialise the detector's FPN from the pretrained neck (neck.pt "
        "next to encoder.pt): auto = whenever the weights have one; true = they must (an "
        "error otherwise); false = a fresh FPN. Only the FPN modules that received a gradient "
        "in pretraining load (encoder.json trained_modules); the others start fresh and train "
        "at finetune.lr, not encoder_lr_mult")
    detection_box_head: bool | Literal["auto"] = Field(
        "auto", description="initialise the detector's box head from the pretrained one "
        "(box_head.pt, InsLoc's 4conv-1fc head): auto / true / false as detection_neck. The "
        "detector of every init uses that head's architecture whenever the weights have one")
    drop_channels: DropChannelsConfig | None = Field(
        None, description="{from: DIR/artifacts.json, top_k: N}: zero the N channels of the "
        "encoder's stage outputs most responsive to an artifact (densessl probe-artifacts) "
        "during fine-tuning and evaluation (segmentation, linear_probe)")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads while "
                                    "fine-tuning (1 avoids OpenMP spin-waits on a shared CPU); "
                                    "null keeps torch's default")

    @field_validator("label_fractions")
    @classmethod
    def _fractions(cls, value):
        if not value or not all(0 < f <= 1 for f in value):
            raise ValueError("expected a non-empty list of fractions in (0, 1]")
        return value

    @field_validator("detection_neck", "detection_box_head", mode="before")
    @classmethod
    def _auto_or_bool(cls, value):
        # One message instead of pydantic's one per union member.
        if not (isinstance(value, bool) or value == "auto"):
            raise ValueError("expected auto, true or false")
        return value

    @field_validator("tasks", "inits", "seeds", "segmentation_archs", "detection_archs",
                     "probe_levels")
    @classmethod
    def _non_empty(cls, value):
        if not value:
            raise ValueError("expected a non-empty list")
        return value

    @model_validator(mode="after")
    def _drop_channels_tasks(self):
        if self.drop_channels is not None and "detection" in self.tasks:
            raise ValueError("finetune.drop_channels applies to segmentation and linear_probe; "
                             "the detector's FPN reads the encoder another way (run detection "
                             "in a recipe without drop_channels)")
        return self

    @model_validator(mode="after")
    def _pretrain_seeds(self):
        n = self.pretrain_seeds
        if n is not None and len(n) not in (1, len(self.seeds)) and len(self.seeds) != 1:
            raise ValueError(f"finetune.pretrain_seeds: expected 1 seed or as many as "
                             f"finetune.seeds ({len(self.seeds)}), got {len(n)} (or give one "
                             "finetune.seeds, used for every pretraining run)")
        return self

    def task_keys(self) -> list[str]:
        """Every fine-tuning configuration's results.json name, in run order."""
        archs = {"segmentation": self.segmentation_archs, "detection": self.detection_archs,
                 "linear_probe": [None]}
        return [task_key(task, arch, f) for f in self.label_fractions for task in self.tasks
                for arch in archs[task]]

    @model_validator(mode="after")
    def _primary(self):
        if self.primary is not None:
            try:
                resolve_primary(self.primary, self.task_keys())
            except ValueError as exc:
                raise ValueError(f"finetune.primary {exc}") from None
        return self


class NoiseConfig(Section):
    """Controlled noisy positive pairs (densessl.pairs.noise.NoisyPairs wraps the builder)."""

    kind: Literal["none", "mismatch", "partial_change", "misregistration", "wrong_class"] = Field(
        "none", description="how source B is corrupted; none = clean pairs")
    amount: float = Field(0.0, ge=0, description="strength: mismatch probability, changed area "
                          "fraction, shift in pixels (misregistration) or fraction of instances "
                          "swapped (wrong_class)")
    rate: float = Field(1.0, ge=0, le=1, description="probability that a pair is corrupted")
    patch: int = Field(8, ge=1, description="side of the replaced squares (partial_change)")
    rotation_degrees: float = Field(0.0, ge=0, le=180, description="extra rotation of source B "
                                    "(misregistration)")
    seed: int | None = Field(None, description="seed of the noise draws; default: recipe seed")

    @model_validator(mode="after")
    def _fraction(self):
        if self.kind in ("mismatch", "partial_change", "wrong_class") and self.amount > 1:
            raise ValueError(f"noise.amount for {self.kind} is a fraction in [0, 1]")
        return self


class Recipe(Section):
    name: str = "unnamed"
    seed: int = 0
    data: DataConfig = DataConfig()
    pairs: PairsConfig = PairsConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    noise: NoiseConfig = NoiseConfig()

    @model_validator(mode="after")
    def _views_inside_sources(self):
        # a view larger than its source is an upsampled crop: no pixel of it is real detail
        if self.augment.view_size > self.data.image_size:
            raise ValueError(f"augment.view_size {self.augment.view_size} is larger than "
                             f"data.image_size {self.data.image_size}: every view would be "
                             "upsampled; raise data.image_size or lower augment.view_size")
        return self

    @model_validator(mode="after")
    def _split_bn_divides_batch(self):
        # SplitBatchNorm2d needs equal sub-batches; otherwise it would quietly fall back to
        # whole-batch statistics, the leak split-BN exists to stop.
        groups, batch = self.model.split_bn_groups, self.train.batch_size
        if self.model.key_bn == "split" and batch % groups:
            divisors = [d for d in range(2, batch + 1) if batch % d == 0]
            raise ValueError(f"model.split_bn_groups: {groups} sub-batches do not divide "
                             f"train.batch_size {batch} (model.key_bn: split gives each "
                             f"sub-batch its own BatchNorm statistics); use one of {divisors} "
                             "or another batch size")
        if self.model.key_bn == "split" and batch // groups < 2:
            raise ValueError(f"model.split_bn_groups: {groups} sub-batches of train.batch_size "
                             f"{batch} leave fewer than 2 samples each (BatchNorm of a 1×1 map "
                             f"then has one value per channel); use at most {max(1, batch // 2)}"
                             " groups or a larger batch")
        return self

    @model_validator(mode="after")
    def _normalisation_per_channel(self):
        # one mean / std per band (or one scalar for all): a list of another length has no
        # band to pair each value with, in pretraining and fine-tuning alike
        c = self.data.channels
        for name in ("mean", "std"):
            value = getattr(self.augment, name)
            if name == "std" and isinstance(value, (list, float, int)) and not isinstance(
                    value, bool) and min(value if isinstance(value, list) else [value]) <= 0:
                raise ValueError(f"augment.std: {value} has a value <= 0; every band's std "
                                 "must be positive")
            if isinstance(value, list) and len(value) != c:
                raise ValueError(f"augment.{name}: {len(value)} values {value} for data.channels "
                                 f"{c}; give one value per channel or a single number")
        return self

    @model_validator(mode="after")
    def _views_on_the_dense_grid(self):
        # the correspondence grid has one cell per model.dense_stride pixels of a view
        # (densessl.augment.ViewAugmentation's grid_stride is the encoder's dense stride)
        size, stride = self.augment.view_size, self.model.dense_stride
        if size % stride:
            lower, upper = max(size // stride * stride, stride), -(-size // stride) * stride
            raise ValueError(f"augment.view_size {size} is not a multiple of model.dense_stride "
                             f"{stride} (one correspondence cell per {stride} pixels); use "
                             f"{lower} or {upper}")
        return self

    @model_validator(mode="after")
    def _instance_needs_fpn(self):
        instance = self.loss.instance
        if instance.weight > 0 and self.model.neck != "fpn":
            raise ValueError(f"loss.instance.weight {instance.weight} > 0 needs "
                             f"model.neck: fpn, got {self.model.neck!r} (RoIAlign reads the FPN "
                             f"levels p{instance.roi_min_level}..p5, which share one width)")
        return self

    def class_id_uses(self) -> list[str]:
        """What of the pretraining reads class ids, in words (empty when nothing does)."""
        uses = []
        objectives = self.loss.dense.weight > 0 or self.loss.instance.weight > 0
        if self.loss.queue == "per_class" and objectives:
            uses.append("class ids (per-class queues)")
        if self.noise.kind == "wrong_class":
            uses.append("class ids (wrong_class noise)")
        return uses

    def control_overrides(self, name: str) -> tuple[dict[str, Any], str]:
        """The dotted overrides of pretraining control ``name`` (``label_free`` or one of
        ``finetune.controls``) and the key they come from."""
        cfg = self.finetune
        if name == "label_free":
            return cfg.label_free_set, "finetune.label_free_set"
        return cfg.controls[name], f"finetune.controls.{name}"

    def control_recipe(self, name: str) -> Recipe:
        """This recipe with control ``name``'s overrides applied (same budget): what ``densessl
        run`` pretrains for that init. The control fine-tunes nothing itself, so its own
        controls are dropped."""
        overrides, where = self.control_overrides(name)
        data = apply_overrides(self.model_dump(mode="json", by_alias=True),
                               [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
        data["finetune"]["inits"] = [i for i in data["finetune"]["inits"]
                                     if i in BUILTIN_INITS and i != "label_free"] or ["random"]
        data["finetune"]["controls"] = {}
        try:
            return parse_recipe(data, where)
        except RecipeError as exc:
            raise ValueError(f"{where} {overrides}: the control recipe is invalid "
                             f"({exc})") from None

    @model_validator(mode="after")
    def _controls(self):
        # every init is a built-in or a named control, and every control that runs is a valid
        # recipe; label_free must also read no class ids
        cfg = self.finetune
        clash = sorted(set(cfg.controls) & set(BUILTIN_INITS))
        if clash:
            raise ValueError(f"finetune.controls: {clash} are built-in inits; name the control "
                             "otherwise")
        unknown = [i for i in cfg.inits if i not in BUILTIN_INITS and i not in cfg.controls]
        if unknown:
            raise ValueError(f"finetune.inits: {unknown} are neither built-in inits "
                             f"({', '.join(BUILTIN_INITS)}) nor names of finetune.controls "
                             f"({', '.join(cfg.controls) or 'none'})")
        for name in cfg.inits:
            if name in cfg.controls:
                self.control_recipe(name)
        if "label_free" not in cfg.inits:
            return self
        control = self.control_recipe("label_free")
        if control.class_id_uses():
            raise ValueError(f"finetune.label_free_set {cfg.label_free_set}: the control still "
                             f"reads {' + '.join(control.class_id_uses())}; set loss.queue: "
                             "single (and no wrong_class noise)")
        return self


def _keys_of(model: type[BaseModel]) -> dict[str, Any]:
    """A section's fields by the key a recipe writes (the alias where there is one)."""
    return {field.alias or name: field for name, field in model.model_fields.items()}


def _section_at(path: tuple) -> type[BaseModel] | None:
    model: Any = Recipe
    for key in path:
        field = _keys_of(model).get(key) if isinstance(model, type) and \
            issubclass(model, BaseModel) else None
        if field is None:
            return None
        model = field.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _describe(error: dict, source: str) -> str:
    loc = tuple(p for p in error["loc"] if not isinstance(p, int))
    key = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        section = _section_at(loc[:-1])
        valid = sorted(_keys_of(section)) if section else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"recipe {source}: {key}: unknown key ({hint}valid keys: {', '.join(valid)})"
    found = error.get("input")
    found_text = "" if isinstance(found, dict) else f", got {found!r}"
    where = f"{key}: " if key else ""  # recipe-wide checks name their keys in the message
    msg = error["msg"].removeprefix("Value error, ")  # pydantic's prefix to our own messages
    return f"recipe {source}: {where}{msg}{found_text}"


def parse_recipe(data: dict, source: str = "<dict>") -> Recipe:
    """``data`` validated. A former flat ``loss.*`` key (before the objectives' sections) is
    one line naming its new place; a saved recipe of that time reads through
    :func:`migrate_flat_loss` first."""
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {source}: expected a mapping of sections at the top level, "
                          f"got {type(data).__name__}")
    loss = data.get("loss")
    moved = _moved_keys(loss) if isinstance(loss, dict) else []
    if moved:
        raise RecipeError(f"recipe {source}: "
                          f"{'; '.join(moved_key_message(k) for k in moved)} (each objective "
                          "has its own loss section since issue #28)")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_describe(exc.errors()[0], source)) from None


#: what ``--set KEY=VALUE`` expects after the ``=``, said when a value is not valid YAML
OVERRIDE_VALUES = ("a YAML value: a number, true/false, null, a list [a, b], a mapping "
                   "{k: v} or a string (quote a string YAML would misread, e.g. \"'[x'\")")


def yaml_problem(exc: yaml.YAMLError, line: bool = True) -> str:
    """A YAML error in one line: what is wrong and where (1-based line and column, from yaml's
    ``problem_mark``), e.g. ``expected ',' or ']', but got '}' (while parsing a flow sequence)
    at line 2, column 17``; ``line=False`` leaves the line out (a one-line value)."""
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    context = getattr(exc, "context", None)
    if context:
        problem += f" ({' '.join(str(context).split())})"
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is None:
        return problem
    where = f"line {mark.line + 1}, column {mark.column + 1}" if line else \
        f"column {mark.column + 1}"
    return f"{problem} at {where}"


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a raw recipe dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {item!r}: expected key=value, e.g. train.max_steps=10")
        parts = key.split(".")
        if not all(part.strip() for part in parts):
            raise RecipeError(f"--set {item!r}: {key!r} has an empty part; expected dotted "
                              "recipe keys, e.g. train.max_steps=10")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise RecipeError(f"--set {key}: {raw!r} is not valid YAML: "
                              f"{yaml_problem(exc, line=False)}; expected {OVERRIDE_VALUES}"
                              ) from None
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return data


def recipes_dir() -> Path:
    """The folder of the shipped recipes: ``densessl/recipes/`` inside an installed wheel (the
    build copies the repository's ``recipes/`` there, setup.py), else the ``recipes/`` of the
    source checkout this package runs from (editable install, ``pythonpath``)."""
    packaged = resources.files("densessl") / "recipes"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "recipes"


def packaged_recipe(name: str) -> Path:
    """Recipe ``name`` (e.g. ``xray_segloc``) as shipped with the package: found in a wheel
    install as in a source checkout (same files as the repository's recipes/)."""
    return recipes_dir() / f"{name}.yaml"


def demo_recipe_path() -> Path:
    """The demo recipe shipped inside the package (same as recipes/demo.yaml)."""
    return packaged_recipe("demo")


def recipe_path(value: str | Path) -> Path:
    """``value`` as a path, where the name ``demo`` is the demo recipe shipped in the package
    (so the CLI, the Python API and a sweep's ``base`` all accept it)."""
    return demo_recipe_path() if str(value) == "demo" else Path(value)


def read_recipe_dict(path: str | Path, kind: str = "recipe", _chain: tuple = ()) -> dict:
    """The YAML mapping in ``path``; a missing file or bad YAML is one RecipeError line.

    A recipe may name another as its ``base`` (a path relative to it, or ``demo``): the base
    is read first (bases may have bases) and this file's keys are merged over it, section by
    section; a list or a scalar replaces the base's value, ``null`` sets it to null. Sweep
    files have a ``base`` of their own (densessl.sweep) and are read as they are.
    """
    path = Path(path)
    # a base names the recipe that inherits it: the file to fix and how it was reached
    name = f"{kind} {path}" + (f" (base of {_chain[-1]})" if _chain else "")
    if not path.is_file():
        raise RecipeError(f"{kind} {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{name}: not valid YAML: {yaml_problem(exc)}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{name}: not a YAML text file (not UTF-8)") from None
    if data is None:  # an empty file, or comments only: never the all-defaults recipe
        example = ("`base: demo` then the keys to change (densessl recipe demo prints "
                   "every key)" if kind == "recipe" else "`base: demo` and a `grid:`")
        raise RecipeError(f"{name} is empty: a {kind} is a YAML mapping, e.g. {example}")
    if not isinstance(data, dict):
        raise RecipeError(f"{name}: expected a YAML mapping (key: value lines) at the top "
                          f"level, got {_yaml_kind(data)}")
    if kind != "recipe" or "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base:
        raise RecipeError(f"recipe {path}: base: expected a recipe path or 'demo', got {base!r}")
    base_path = recipe_path(base)
    if base != "demo" and not base_path.is_absolute():
        base_path = path.parent / base_path
    chain = (*_chain, path.resolve())
    if base_path.resolve() in chain:
        loop = " -> ".join(str(p) for p in (*chain, base_path.resolve()))
        raise RecipeError(f"recipe {path}: base: recipes inherit in a loop ({loop})")
    if not base_path.is_file():
        raise RecipeError(f"recipe {path}: base: {str(base_path)!r} not found")
    return _merged(read_recipe_dict(base_path, kind, chain), data)


def _yaml_kind(value) -> str:
    """What a YAML document holds, in words: ``a list``, ``the string 'x'``."""
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"the string {value!r}" if len(value) <= 40 else "a string"
    return f"the {type(value).__name__} {value!r}"


def _merged(base: dict, child: dict) -> dict:
    """``child`` over ``base``: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def load_recipe(path_or_dict: str | Path | dict | Recipe, overrides: list[str] | None = None
                ) -> Recipe:
    """A Recipe from a YAML path (or ``"demo"``), a dict or a Recipe, with optional
    ``key=value`` overrides."""
    if isinstance(path_or_dict, Recipe):
        data, source = path_or_dict.model_dump(), "<Recipe>"
    elif isinstance(path_or_dict, dict):
        # deep: overrides write into nested sections, which must not be the caller's
        data, source = copy.deepcopy(path_or_dict), "<dict>"
    else:
        path = recipe_path(path_or_dict)
        # errors name the recipe as given, or the packaged file for "demo"
        source = str(path_or_dict) if path == Path(path_or_dict) else str(path)
        data = read_recipe_dict(path)
    return parse_recipe(apply_overrides(data, overrides or []), source)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
