"""``densessl export``: encoder.pt → the key layout of torchvision, smp, timm or detectron2.

Every export writes a model card next to the file (``FILE.card.json`` and ``FILE.card.md``):
architecture, datasets and their licences, the pretraining recipe, metrics, versions.

Layouts (``encoder.pt`` is already torchvision's ResNet layout without ``fc``):

* ``torchvision``: ``torchvision.models.resnetXX`` keys (load with ``strict=False``: only
  ``fc.*`` missing, or set ``model.fc = nn.Identity()`` first). With ``neck=True``: the layout
  of torchvision's detection ``BackboneWithFPN`` (``body.*``, ``fpn.*``), for
  ``FasterRCNN(backbone=...)``.
* ``smp``: ``model.encoder.load_state_dict(sd)`` of any smp model with ``encoder_name=resnetXX``.
* ``timm``: ``timm.create_model("resnetXX", num_classes=0, in_chans=C).load_state_dict(sd)``.
* ``detectron2``: a ``.pkl`` ``{"model": {name: ndarray}, "__author__", "matching_heuristics"}``
  with d2's ResNet names (``stem.conv1``, ``res2..res5``, ``convK.norm``, ``shortcut``), as
  detectron2's own torchvision converter writes; ``neck=True`` adds ``fpn_lateralK`` /
  ``fpn_outputK``. Use as ``MODEL.WEIGHTS``.

A ``timm:<name>`` backbone (``encoder.pt`` in timm's ``features_only`` layout) exports to:

* ``timm``: the keys of ``timm.create_model(name, num_classes=0, in_chans=C)``; load with
  ``strict=False``: only the layers after the last feature stage (e.g. ConvNeXt's
  ``head.norm``, EfficientNet's ``conv_head``/``bn2``) are missing, the card lists them.
* ``smp``: ``model.encoder`` of an smp model with ``encoder_name="tu-<name>"`` (smp keeps the
  timm features model as ``model.``), where smp's universal timm encoder accepts the model.
* ``torchvision`` / ``detectron2``: refused (neither has these architectures).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import pickle
import re
import warnings as _warnings
from pathlib import Path

import torch
from torch import Tensor

from densessl.data.manifest import canonical_licence, inherited_terms
from densessl.errors import DensesslError
from densessl.io import atomic_write, save_torch, write_json, write_text
from densessl.models.backbones import get_backbone_spec
from densessl.models.health import encoder_problems
from densessl.models.weights import (
    check_encoder_state,
    guess_backbone,
    read_side_json,
    read_side_state,
    read_state_file,
)
from densessl.version import __version__

TARGETS = ("torchvision", "smp", "timm", "detectron2")

LOAD_HINTS = {
    "torchvision": "m = torchvision.models.{backbone}(); m.fc = torch.nn.Identity(); "
                   "m.load_state_dict(torch.load(FILE))",
    "torchvision+fpn": "b = torchvision.models.detection.backbone_utils.BackboneWithFPN(...); "
                       "b.load_state_dict(torch.load(FILE))",
    "smp": "m = smp.Unet('{backbone}', encoder_weights=None, in_channels={in_channels}); "
           "m.encoder.load_state_dict(torch.load(FILE))",
    "timm": "m = timm.create_model('{backbone}', num_classes=0, in_chans={in_channels}); "
            "m.load_state_dict(torch.load(FILE))",
    "detectron2": "cfg.MODEL.WEIGHTS = FILE  (RESNETS.DEPTH matching {backbone}, "
                  "STRIDE_IN_1X1=False, RES2_OUT_CHANNELS=64 for resnet18/34)",
    "timm:smp": "m = smp.Unet('tu-{name}', encoder_weights=None, in_channels={in_channels}); "
                "m.encoder.load_state_dict(torch.load(FILE))",
    "timm:timm": "m = timm.create_model('{name}', num_classes=0, in_chans={in_channels}); "
                 "m.load_state_dict(torch.load(FILE), strict=False)  (missing: the head)",
}


def timm_full_state(name: str, in_channels: int, state: dict[str, Tensor]
                    ) -> tuple[dict[str, Tensor], list[str]]:
    """A timm ``features_only`` state dict → the keys of the full model
    ``timm.create_model(name, num_classes=0, in_chans=in_channels)``, and the full model's
    keys it has no value for (the layers after the last feature stage).

    timm's feature wrappers flatten the first level of ``nn.Sequential`` children into
    ``parent_child`` names (``stem.0`` → ``stem_0``) or keep the model's own names; each key
    is matched against the full model's under both spellings, with equal shapes."""
    import timm

    full = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels)
    ref = full.state_dict()
    spellings: dict[str, list[str]] = {}
    for key in ref:
        for spelled in dict.fromkeys((key, key.replace(".", "_", 1))):
            spellings.setdefault(spelled, []).append(key)
    out = {}
    for key, value in state.items():
        found = [k for k in spellings.get(key, []) if ref[k].shape == value.shape]
        if len(found) != 1:
            raise DensesslError(
                f"export --to timm: timm:{name}'s feature key {key!r} matches "
                f"{len(found)} keys of timm.create_model({name!r}) (expected one); this model's "
                "features_only layout cannot be mapped back: export --to smp, or load "
                "encoder.pt itself into timm.create_model(name, features_only=True)")
        out[found[0]] = value
    return out, sorted(set(ref) - set(out))


def detectron2_name(key: str) -> str | None:
    """torchvision ResNet key → detectron2 name (``None``: not stored, e.g. BN step count)."""
    if key.endswith("num_batches_tracked"):
        return None
    if key == "conv1.weight":
        return "stem.conv1.weight"
    if key.startswith("bn1."):
        return "stem.conv1.norm." + key[4:]
    m = re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", key)
    if m is None:
        raise DensesslError(f"detectron2 export: unexpected key {key!r}")
    stage, block, rest = int(m[1]) + 1, m[2], m[3]
    rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
    rest = rest.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
    return f"res{stage}.{block}.{rest}"


def detectron2_fpn_name(key: str) -> str:
    """Our FPNNeck key (``fpn.inner_blocks.I.0.weight``) → d2 ``fpn_lateral{I+2}.weight``."""
    m = re.fullmatch(r"fpn\.(inner|layer)_blocks\.(\d)\.0\.(weight|bias)", key)
    if m is None:
        raise DensesslError(f"detectron2 export: unexpected neck key {key!r}")
    kind = "lateral" if m[1] == "inner" else "output"
    return f"fpn_{kind}{int(m[2]) + 2}.{m[3]}"


def convert_timm(state: dict[str, Tensor], to: str, backbone: str, in_channels: int) -> dict:
    """A ``timm:<name>`` encoder's state in ``to``'s layout (``timm`` or ``smp``)."""
    spec = get_backbone_spec(backbone)
    if to not in spec.export_targets:
        raise DensesslError(
            f"export --to {to}: model.backbone {backbone} has no {to} counterpart ({to} "
            f"export is for resnet18/34/50); for timm backbones use --to timm or --to smp "
            f"(smp encoder '{spec.smp_encoder}')")
    if to == "smp":
        return spec.to_smp_state(state)
    return timm_full_state(spec.model_name, in_channels, state)[0]


def convert(state: dict[str, Tensor], to: str, neck: dict[str, Tensor] | None = None) -> dict:
    """The ResNet encoder (and neck) state in ``to``'s layout (see the module docstring)."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if to in ("smp", "timm"):
        return dict(state)
    if to == "torchvision":
        if neck is None:
            return dict(state)
        return {**{f"body.{k}": v for k, v in state.items()},
                **{k: v for k, v in neck.items()}}  # FPNNeck keys already start with "fpn."
    if to == "detectron2":
        model = {}
        for key, value in state.items():
            name = detectron2_name(key)
            if name is not None:
                model[name] = value.detach().cpu().numpy()
        for key, value in (neck or {}).items():
            model[detectron2_fpn_name(key)] = value.detach().cpu().numpy()
        return {"model": model, "__author__": f"densessl {__version__}",
                "matching_heuristics": True}
    raise DensesslError(f"export --to {to!r}: unknown target; valid: {', '.join(TARGETS)}")


def _read_results(weights: Path, warnings: list[str] | None = None) -> dict | None:
    """The fine-tuning ``results.json`` next to ``weights`` or one folder up (optional: a
    damaged one is left out with a warning naming it)."""
    for path in (weights.parent / "results.json", weights.parent.parent / "results.json"):
        try:
            found = read_side_json(path)
        except DensesslError as exc:
            if warnings is not None:
                warnings.append(f"downstream results left out: {exc}")
            continue
        if found:
            return found
    return None


def _read_neck_keys(weights: Path) -> list[str] | None:
    """The keys of the neck.pt next to ``weights`` (``None``: there is none; a damaged one is an
    error naming it)."""
    neck = read_side_state(weights.parent / "neck.pt")
    return None if neck is None else list(neck)


def side_file_warnings(weights: Path) -> list[str]:
    """What the model card cannot say because a side file is missing (each names the file).
    Damaged side files are errors, raised here before anything is written."""
    notes = []
    encoder_json = weights.with_suffix(".json")
    if read_side_json(encoder_json) is None:
        notes.append(f"no {encoder_json.name} next to {weights} ({encoder_json}): the datasets, "
                     "their licences and the pretraining recipe are unknown")
    read_side_json(weights.parent / "metrics.json")
    return notes


def model_card(weights: Path, file: Path, to: str, backbone: str, in_channels: int,
               with_neck: bool) -> dict:
    """Provenance for an exported file, from the files ``densessl pretrain``/``run`` leave
    next to ``encoder.pt`` (encoder.json, metrics.json, recipe.yaml, ../results.json)."""
    provenance = read_side_json(weights.with_suffix(".json")) or {}
    metrics = read_side_json(weights.parent / "metrics.json") or {}
    warnings = side_file_warnings(weights)
    results = _read_results(weights, warnings)
    recipe_file = weights.parent / "recipe.yaml"
    datasets = provenance.get("datasets") or metrics.get("datasets") or []
    if not datasets:
        source = provenance.get("data_source", "unknown")
        licence = ("Apache-2.0 (generated by densessl)" if source == "synthetic"
                   else "unknown: no dataset card was recorded; check your data's licence")
        datasets = [{"name": source, "licence": licence}]
    # the most restrictive terms inherited: per-image licences when a manifest was used,
    # otherwise one per dataset card
    images = provenance.get("provenance") or metrics.get("provenance")
    counts = (images or {}).get("licences") or {}
    if not counts:
        for d in datasets:
            lic = canonical_licence(d.get("licence", d.get("license")))
            counts[lic] = counts.get(lic, 0) + 1
    terms = inherited_terms(counts)
    hint_key = "torchvision+fpn" if (to == "torchvision" and with_neck) else to
    if get_backbone_spec(backbone).family == "timm":
        hint_key = f"timm:{to}"
    # weights from before model.fpn_upsample existed were trained with torchvision's nearest
    upsample = provenance.get("fpn_upsample", "nearest")
    warnings += list(terms.pop("warnings"))
    if with_neck and upsample != "nearest":
        warnings.append(
            f"the FPN was pretrained with {upsample} top-down upsampling (cells stay where "
            "their features are centred); torchvision's and detectron2's FPN upsample "
            "nearest, so there its odd cells see a neighbour's top-down value: fine-tune, or "
            "load the neck into densessl.models.neck.CentredFeaturePyramidNetwork for the "
            "pretrained features exactly")
    trained = (provenance.get("trained_modules") or {}).get("neck")
    if with_neck and isinstance(trained, list):
        untrained = [k.rsplit(".", 2)[0] for k in (_read_neck_keys(weights) or [])]
        untrained = [u for u in dict.fromkeys(untrained) if u not in trained]
        if untrained:
            # encoder.json trained_modules (densessl.models.trained_modules)
            warnings.append(
                f"FPN modules {untrained} never received a gradient in pretraining (the "
                "objectives read other levels): their weights are the random init; "
                "re-initialise them rather than treating them as pretrained (densessl's own "
                "detection fine-tuning does)")
    return {
        "file": file.name,
        "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
        "target": to,
        "load": LOAD_HINTS[hint_key].format(backbone=backbone, in_channels=in_channels,
                                            name=get_backbone_spec(backbone).model_name),
        "architecture": {"backbone": backbone, "in_channels": in_channels,
                         "neck": "fpn" if with_neck else None,
                         **({"fpn_upsample": upsample} if with_neck else {})},
        "warnings": warnings,
        "datasets": datasets,
        "terms": terms,
        "image_provenance": images,
        "recipe": recipe_file.read_text() if recipe_file.is_file() else provenance.get("recipe"),
        "pretraining": {k: metrics.get(k) for k in ("steps", "final", "pairs_per_s")
                        if k in metrics} or {k: provenance.get(k) for k in ("steps",)},
        "downstream_results": results,
        "source_weights": str(weights.resolve()),
        "versions": {"densessl": __version__, "torch": torch.__version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _card_markdown(card: dict) -> str:
    lines = [f"# Model card: {card['file']}", "",
             f"- target layout: **{card['target']}**; load: `{card['load']}`",
             f"- architecture: {card['architecture']}",
             f"- sha256: `{card['sha256']}`", f"- versions: {card['versions']}",
             f"- created: {card['created']}", ""]
    lines += [f"**Warning:** {w}" for w in card["warnings"]] + ["", "## Datasets (and licences)",
                                                                ""]
    lines += [f"- {d.get('name', '?')}: {d.get('licence', d.get('license', 'unknown'))}"
              for d in card["datasets"]]
    terms, images = card.get("terms") or {}, card.get("image_provenance")
    lines += ["", "## Terms of use inherited from the pretraining images", "",
              f"**{terms.get('statement', 'unknown')}**", ""]
    if images:
        lines += [f"- images used: {images['images_used']} of {images['images_total']} "
                  f"(dropped: {images['dropped'] or 'none'})",
                  f"- licences: {images['licences']}",
                  f"- filters: {images['filters']}",
                  f"- manifest sha256: `{images['manifest_sha256']}`"]
    if card.get("attribution_file"):
        lines.append(f"- per-image attribution: `{card['attribution_file']}`")
    lines += ["", "## Pretraining", "", "```json", json.dumps(card["pretraining"], indent=1),
              "```", "", "## Downstream results", "", "```json",
              json.dumps(card["downstream_results"], indent=1), "```", "", "## Recipe", "",
              "```yaml", str(card["recipe"]), "```", ""]
    return "\n".join(lines)


def export_weights(weights: str | Path, to: str, out: str | Path, neck: bool = False,
                   overwrite: bool = False, force: bool = False) -> Path:
    """Convert ``weights`` (encoder.pt) for ``to`` and write ``out`` + its model card.

    ``neck=True`` also exports ``neck.pt`` (found next to ``weights``) where the target has an
    FPN (torchvision detection backbone, detectron2). ``out`` may be a folder (the file is
    then ``<weights stem>.<to>.pt``, ``.pkl`` for detectron2). An existing ``out`` is kept
    unless ``overwrite``; the input itself never is. A non-finite or collapsed encoder is
    refused unless ``force``. Returns the written path.
    """
    folder = str(out).endswith(("/", os.sep))  # Path() drops a trailing slash
    weights, out = Path(weights), Path(out)
    if to not in TARGETS:
        raise DensesslError(f"export --to {to!r}: unknown target; valid: {', '.join(TARGETS)}")
    if not weights.is_file():
        raise DensesslError(f"export: weights {str(weights)!r} not found")
    if out.is_dir() or folder:
        out = out / f"{weights.stem}.{to}.{'pkl' if to == 'detectron2' else 'pt'}"
    inputs = {weights.resolve(), (weights.parent / "neck.pt").resolve()}
    written = [out, out.with_name(out.name + ".card.json"), out.with_name(out.name + ".card.md"),
               out.with_name(out.name + ".attribution.csv")]
    if any(p.resolve() in inputs for p in written):
        raise DensesslError(f"export: --out {out} would overwrite the input weights; choose "
                            "another file")
    if out.exists() and not overwrite:
        raise DensesslError(f"export: {out} exists; pass --overwrite to replace it")
    state = read_state_file(weights, "export:")
    # side files read strictly, before anything is written: a damaged encoder.json,
    # metrics.json or neck.pt is an error naming it (the card would otherwise say "unknown")
    provenance = read_side_json(weights.with_suffix(".json")) or {}
    missing_notes = side_file_warnings(weights)
    named = provenance.get("backbone")
    timm_backbone = bool(named) and get_backbone_spec(str(named)).family == "timm"
    if timm_backbone:
        # a timm encoder.pt is only identified by its encoder.json
        backbone, in_channels = provenance["backbone"], provenance.get("in_channels")
        if not isinstance(in_channels, int):
            raise DensesslError(f"export: {weights.with_suffix('.json')} names {backbone} but "
                                "has no integer 'in_channels'")
        if to not in get_backbone_spec(backbone).export_targets:
            convert_timm({}, to, backbone, in_channels)  # the clear error, before any work
    else:
        if not isinstance(state, dict) or "conv1.weight" not in state:
            raise DensesslError(f"export: {weights} is not a ResNet encoder in torchvision "
                                "layout (no conv1.weight) and no encoder.json next to it names "
                                "a timm backbone; pass the encoder.pt written by pretraining")
        backbone = provenance.get("backbone") or guess_backbone(state)
        if backbone is None:
            raise DensesslError(f"export: {weights}: not a resnet18/34/50 encoder")
        in_channels = int(state["conv1.weight"].shape[1])
    check_encoder_state(state, backbone, in_channels, f"export: {weights}")
    problems = encoder_problems(state, read_side_json(weights.parent / "metrics.json"))
    if problems and not force:
        raise DensesslError(f"export: {weights} is not a usable encoder ({'; '.join(problems)}); "
                            "pass --force to export it anyway")
    neck_state = None
    if neck:
        if to in ("smp", "timm"):
            raise DensesslError(f"export --neck: {to} has no FPN matching ours; export the "
                                "encoder alone")
        neck_path = weights.parent / "neck.pt"
        if not neck_path.is_file():
            raise DensesslError(f"export --neck: no neck.pt next to {weights} (pretrained "
                                "with model.neck: none?)")
        neck_state = read_side_state(neck_path)
    for note in missing_notes:  # an export that goes ahead says what its card cannot tell
        _warnings.warn(f"export: {note}", UserWarning, stacklevel=2)
    if timm_backbone:
        converted = convert_timm(state, to, backbone, in_channels)
    else:
        converted = convert(state, to, neck_state)
    if to == "detectron2":
        atomic_write(out, lambda tmp: tmp.write_bytes(pickle.dumps(converted)))
    else:
        save_torch(out, converted)
    card = model_card(weights, out, to, backbone, in_channels, neck_state is not None)
    if timm_backbone and to == "timm":
        missing = timm_full_state(get_backbone_spec(backbone).model_name, in_channels, state)[1]
        card["missing_keys"] = missing  # what strict=False leaves at its random init
    # CC-BY asks for attribution: the per-image file pretraining wrote travels with the weights
    attribution = weights.parent / "attribution.csv"
    copy = out.with_name(out.name + ".attribution.csv")
    if attribution.is_file():
        write_text(copy, attribution.read_text())
        card["attribution_file"] = copy.name
    else:
        copy.unlink(missing_ok=True)  # an earlier export's would describe other weights
    write_json(out.with_name(out.name + ".card.json"), card)
    write_text(out.with_name(out.name + ".card.md"), _card_markdown(card))
    return out
