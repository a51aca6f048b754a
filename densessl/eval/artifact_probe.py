"""Spurious-artifact probe (watermarks, scanner stamps, no-data borders) and its mitigation.

:func:`probe_artifacts` overlays an artifact (``text``, ``logo``, ``border``, an RGBA PNG, or
``none``: the artifact-free control) on held-out images at random positions, scales and
opacities, encodes the clean and the stamped image, and measures for every channel of every
backbone stage (c2..c5; each channel spatially max-pooled, since an artifact is local):

* the **activation shift**: mean over images of (stamped − clean), in units of the channel's
  standard deviation over the clean images (a paired, standardised effect size);
* the **one-channel probe accuracy**: a logistic regression on that channel alone detects
  "stamped or not" — each image shows up once, stamped or clean by a seeded coin, the
  regression is fitted on half of the images and scored on the other half. A channel
  *carries* the artifact when that accuracy is above chance at a Bonferroni-corrected
  one-sided binomial level (``alpha`` over all channels), so an artifact-free control marks
  none with probability ≥ 1 − alpha.

Channels are ranked by probe accuracy, then by |shift|. :func:`write_report` writes
``artifacts.json`` (the ranked table), ``artifacts.md`` and ``artifacts.png``.

Mitigation: ``finetune.drop_channels: {from: DIR/artifacts.json, top_k: N}`` —
:func:`read_drop_channels` takes the N top-ranked channels and :func:`attach_channel_drop`
zeroes them in the encoder's stage outputs (what the segmentation decoder and the linear probe
read) during fine-tuning and evaluation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from densessl.errors import DensesslError
from densessl.eval.normalise import normalise
from densessl.io import atomic_write, write_json, write_text
from densessl.models.levels import LEVELS
from densessl.models.weights import read_side_json

KINDS = ("text", "logo", "border", "none")
# smp ResNet encoders return [input, stem, c2, c3, c4, c5]
SMP_INDEX = {"c2": 2, "c3": 3, "c4": 4, "c5": 5}


# ------------------------------------------------------------------ artifacts


def _render_text(gen: torch.Generator) -> np.ndarray:
    words = ["© SATCORP 2024", "SCANNER-7 12:04:33", "© GEOIMG", "XR-VENDOR", "SAMPLE"]
    text = words[int(torch.randint(len(words), (1,), generator=gen))]
    font = ImageFont.load_default()
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text,
                                                                                 font=font)
    img = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(img).text((1 - left, 1 - top), text, fill=255, font=font)
    return np.asarray(img, dtype=np.float32) / 255.0


def _render_logo() -> np.ndarray:
    img = Image.new("L", (64, 64), 0)
    d = ImageDraw.Draw(img)
    d.ellipse((2, 2, 61, 61), outline=255, width=6)
    d.polygon([(32, 12), (52, 48), (12, 48)], fill=255)
    return np.asarray(img, dtype=np.float32) / 255.0


def load_artifact_png(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """An RGBA (or RGB: opaque) PNG → (colour H×W×3 in [0, 1], alpha H×W)."""
    try:
        with Image.open(path) as img:
            rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
    except OSError as exc:
        raise DensesslError(f"--artifact {path}: cannot read the image ({exc})") from None
    return rgba[..., :3], rgba[..., 3]


def stamp(image: Tensor, artifact: str | tuple[np.ndarray, np.ndarray], gen: torch.Generator
          ) -> tuple[Tensor, Tensor]:
    """``image`` (C×H×W in [0, 1]) with the artifact at a random position, scale and
    opacity; returns (stamped image, H×W alpha actually applied)."""
    c, h, w = image.shape

    def u(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=gen))

    alpha = torch.zeros(h, w)
    colour = torch.ones(c, 1, 1)
    if artifact == "none":
        return image.clone(), alpha
    opacity = u(0.5, 1.0)
    if artifact == "border":  # a no-data band on one or two sides, value 0
        width = max(1, round(u(0.05, 0.2) * min(h, w)))
        sides = torch.randperm(4, generator=gen)[:1 + int(torch.rand((), generator=gen) < 0.5)]
        for s in sides.tolist():
            [alpha[:width, :], alpha[-width:, :], alpha[:, :width], alpha[:, -width:]][s].fill_(1)
        colour = torch.zeros(c, 1, 1)
        opacity = u(0.8, 1.0)
    else:
        if isinstance(artifact, tuple):
            rgb, mask = artifact
            scale = u(0.15, 0.4)
        elif artifact == "text":
            rgb, mask, scale = None, _render_text(gen), u(0.4, 0.9)
        elif artifact == "logo":
            rgb, mask, scale = None, _render_logo(), u(0.15, 0.35)
        else:
            raise DensesslError(f"--artifact {artifact!r}: expected one of {list(KINDS)} or a "
                                ".png file")
        mh, mw = mask.shape
        tw = max(4, min(w, round(scale * w)))
        th = max(2, min(h, round(tw * mh / mw)))
        m = torch.from_numpy(mask)[None, None]
        m = F.interpolate(m, size=(th, tw), mode="bilinear", align_corners=False)[0, 0]
        top = int(torch.randint(h - th + 1, (1,), generator=gen))
        left = int(torch.randint(w - tw + 1, (1,), generator=gen))
        alpha[top:top + th, left:left + tw] = m.clamp(0, 1)
        if rgb is not None:
            col = torch.from_numpy(rgb).permute(2, 0, 1)[None]
            col = F.interpolate(col, size=(th, tw), mode="bilinear", align_corners=False)[0]
            col = col.mean(0, keepdim=True) if c != 3 else col
            full = torch.zeros(col.shape[0], h, w)
            full[:, top:top + th, left:left + tw] = col
            colour = full.expand(c, h, w) if col.shape[0] == 1 else full
        else:  # a light stamp: white, or a light grey
            colour = torch.full((c, 1, 1), u(0.85, 1.0))
    alpha = alpha * opacity
    return image * (1 - alpha) + colour * alpha, alpha


# ------------------------------------------------------------------ measuring


@torch.no_grad()
def pooled_features(encoder: nn.Module, images: Tensor, levels: Sequence[str],
                    mean: Sequence[float], std: Sequence[float], batch_size: int = 32
                    ) -> Tensor:
    """N×ΣC: every channel of every level, max-pooled over space (encoder in eval mode)."""
    encoder.eval()
    rows = []
    for i in range(0, len(images), batch_size):
        out = encoder(normalise(images[i:i + batch_size], mean, std))
        rows.append(torch.cat([out[k].float().amax((-2, -1)) for k in levels], 1))
    return torch.cat(rows)


def one_channel_probe(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor,
                      iters: int = 25, l2: float = 1e-3) -> Tensor:
    """Per-column logistic regression (one feature + bias each, all columns at once by
    Newton's method with a small ridge) fitted on train, accuracy on test (ΣC values)."""
    mu, sd = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    a, b = ((x_train - mu) / sd).double(), ((x_test - mu) / sd).double()
    y = y_train.double()[:, None]
    w = torch.zeros(a.shape[1], dtype=torch.float64)
    c = torch.zeros_like(w)
    for _ in range(iters):
        p = torch.sigmoid(a * w + c)
        r = p - y
        s = p * (1 - p)
        gw, gc = (r * a).mean(0) + l2 * w, r.mean(0)
        hww, hwc, hcc = (s * a * a).mean(0) + l2, (s * a).mean(0), s.mean(0) + 1e-9
        det = hww * hcc - hwc * hwc
        w = w - (hcc * gw - hwc * gc) / det
        c = c - (hww * gc - hwc * gw) / det
    pred = (b * w + c) > 0
    return (pred == y_test.bool()[:, None]).double().mean(0).float()


def binomial_sf(k: int, n: int) -> float:
    """P(X ≥ k) for X ~ Binomial(n, 1/2) (exact)."""
    return sum(math.comb(n, i) for i in range(max(k, 0), n + 1)) / 2 ** n


def probe_artifacts(encoder: nn.Module, images: Tensor, artifact: str | Path = "text", *,
                    levels: Sequence[str] = LEVELS, mean: Sequence[float] = (0.5,),
                    std: Sequence[float] = (0.25,), seed: int = 0, alpha: float = 0.05,
                    batch_size: int = 32) -> dict:
    """Measure how strongly each channel responds to ``artifact`` (see the module docstring).

    Args:
        encoder: returns ``{level: B×C×h×w}`` (e.g. :class:`~densessl.models.backbone.
            ResNetBackbone`); used in eval mode.
        images: N×C×H×W in [0, 1], held-out images (N ≥ 8; a few hundred for a sharp probe).
        artifact: ``text``, ``logo``, ``border``, ``none`` (control) or an RGBA PNG path.
        mean, std: the pretraining normalisation (one value or one per channel).

    Returns a JSON-able dict: ``channels`` (ranked rows: stage, channel, probe_accuracy,
    p_value, shift, carries), ``share`` (fraction of channels that carry it, overall and per
    stage), ``min_significant_accuracy``, ``n_images``, ``n_test``.
    """
    if images.ndim != 4 or len(images) < 8:
        raise DensesslError(f"artifact probe: expected at least 8 images N×C×H×W, got "
                            f"{tuple(images.shape)}")
    c = images.shape[1]
    mean = list(mean) * c if len(mean) == 1 else list(mean)
    std = list(std) * c if len(std) == 1 else list(std)
    kind = str(artifact)
    art = artifact if kind in KINDS else load_artifact_png(artifact)
    # a stream of its own (salted): a caller that ordered the images with the same seed must
    # not get the same permutation back as the stamped / clean labels
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 0x5EED)
    stamped = torch.stack([stamp(im, art, gen)[0] for im in images])
    clean_f = pooled_features(encoder, images, levels, mean, std, batch_size)
    art_f = pooled_features(encoder, stamped, levels, mean, std, batch_size)
    with torch.no_grad():
        sizes = [int(v.shape[1]) for v in
                 (encoder(normalise(images[:1], mean, std))[k] for k in levels)]
    diff = art_f - clean_f
    shift = diff.mean(0) / clean_f.std(0).clamp_min(1e-6)
    n = len(images)
    label = (torch.randperm(n, generator=gen) < n // 2)     # stamped or clean, half each
    x = torch.where(label[:, None], art_f, clean_f)
    # stratified halves: train and test each hold as many stamped as clean images, so a
    # channel that says nothing (a constant predictor) scores exactly 0.5 and the binomial
    # test against 1/2 holds; an unstratified split lets it score the test majority rate
    halves = [idx[torch.randperm(len(idx), generator=gen)]
              for idx in (label.nonzero()[:, 0], (~label).nonzero()[:, 0])]
    m = min(len(h) for h in halves) // 2  # per class and half (an odd image is left out)
    tr = torch.cat([h[:m] for h in halves])
    te = torch.cat([h[m:2 * m] for h in halves])
    acc = one_channel_probe(x[tr], label[tr], x[te], label[te])
    n_test = len(te)
    total = sum(sizes)
    hits = (acc * n_test).round().long()
    p_values = [binomial_sf(int(k), n_test) for k in hits]
    threshold = alpha / total
    min_k = next((k for k in range(n_test + 1) if binomial_sf(k, n_test) < threshold), None)
    stage_of = [(lvl, j) for lvl, size in zip(levels, sizes) for j in range(size)]
    rows = [{"stage": stage_of[i][0], "channel": stage_of[i][1],
             "probe_accuracy": round(float(acc[i]), 4), "p_value": p_values[i],
             "shift": round(float(shift[i]), 4), "carries": p_values[i] < threshold}
            for i in range(total)]
    rows.sort(key=lambda r: (-r["probe_accuracy"], -abs(r["shift"])))
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    share = {"all": sum(r["carries"] for r in rows) / total}
    for lvl, size in zip(levels, sizes):
        share[lvl] = sum(r["carries"] for r in rows if r["stage"] == lvl) / size
    return {"artifact": kind, "n_images": n, "n_test": n_test, "levels": list(levels),
            "stage_channels": dict(zip(levels, sizes)), "alpha": alpha,
            "test": "one-sided binomial vs 0.5, Bonferroni over all channels",
            "min_significant_accuracy": None if min_k is None else round(min_k / n_test, 4),
            "share": share, "channels": rows,
            "_example": (images[0], stamped[0])}


def write_report(result: dict, out: str | Path, top: int = 20) -> dict[str, Path]:
    """``artifacts.json`` (ranked table), ``artifacts.md`` and ``artifacts.png`` in ``out``."""
    out = Path(out)
    example = result.pop("_example", None)
    paths = {"json": write_json(out / "artifacts.json", result)}
    share = result["share"]
    lines = [f"# Artifact probe: {result['artifact']}", "",
             f"{result['n_images']} held-out images, each shown stamped or clean; one-channel "
             f"probe fitted on half, scored on {result['n_test']}. A channel carries the "
             f"artifact when its accuracy is above chance at {result['alpha']} (Bonferroni "
             f"over {sum(result['stage_channels'].values())} channels): accuracy ≥ "
             f"{result['min_significant_accuracy']}.", "",
             "| stage | channels | share carrying |", "|---|---|---|"]
    lines += [f"| {k} | {result['stage_channels'][k]} | {100 * share[k]:.1f} % |"
              for k in result["levels"]]
    lines += [f"| all | {sum(result['stage_channels'].values())} | {100 * share['all']:.1f} % |",
              "", "| rank | stage | channel | probe accuracy | p | shift (σ) | carries |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['rank']} | {r['stage']} | {r['channel']} | {r['probe_accuracy']:.3f} | "
              f"{r['p_value']:.2g} | {r['shift']:+.2f} | {'yes' if r['carries'] else 'no'} |"
              for r in result["channels"][:top]]
    paths["md"] = write_text(out / "artifacts.md", "\n".join(lines) + "\n")
    paths["png"] = _plot(result, example, out / "artifacts.png")
    return paths


def _plot(result: dict, example, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if example is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    for lvl in result["levels"]:
        acc = sorted((r["probe_accuracy"] for r in result["channels"] if r["stage"] == lvl),
                     reverse=True)
        axes[0].plot(np.arange(1, len(acc) + 1) / len(acc), acc, label=lvl)
        rows = [r for r in result["channels"] if r["stage"] == lvl]
        axes[1].scatter([r["shift"] for r in rows], [r["probe_accuracy"] for r in rows], s=6,
                        label=lvl)
    if result["min_significant_accuracy"] is not None:
        for ax in axes[:2]:
            ax.axhline(result["min_significant_accuracy"], color="k", ls="--", lw=1)
    axes[0].set(xlabel="channel quantile within stage", ylabel="one-channel probe accuracy",
                title=f"{result['artifact']}: share carrying {100 * result['share']['all']:.1f} %")
    axes[1].set(xlabel="activation shift (σ of clean)", ylabel="probe accuracy")
    axes[0].legend()
    if example is not None:
        pair = torch.cat([example[0], example[1]], -1)
        img = pair.permute(1, 2, 0).clamp(0, 1).numpy()
        axes[2].imshow(img[..., 0] if img.shape[-1] == 1 else img[..., :3], cmap="gray")
        axes[2].set(title="clean | stamped")
        axes[2].axis("off")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


# ------------------------------------------------------------------ mitigation


def read_drop_channels(path: str | Path, top_k: int) -> dict[str, list[int]]:
    """The ``top_k`` top-ranked channels of an ``artifacts.json``, as ``{stage: [channel]}``."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
        rows = result["channels"]
        sizes = result["stage_channels"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DensesslError(f"finetune.drop_channels.from: {str(path)!r} is not an "
                            f"artifacts.json written by densessl probe-artifacts ({exc})") from None
    if not 1 <= top_k <= len(rows):
        raise DensesslError(f"finetune.drop_channels.top_k: expected 1..{len(rows)} (channels "
                            f"ranked in {path}), got {top_k}")
    drops: dict[str, list[int]] = {}
    for r in sorted(rows, key=lambda r: r["rank"])[:top_k]:
        drops.setdefault(r["stage"], []).append(int(r["channel"]))
    return {"_sizes": sizes, **{k: sorted(v) for k, v in drops.items()}}


def attach_channel_drop(encoder: nn.Module, drops: dict[str, list[int]]):
    """Zero the listed channels of the encoder's stage outputs (a forward hook; the stages
    themselves still compute them, only what leaves the encoder is masked). Works on
    :class:`~densessl.models.backbone.ResNetBackbone` (dict output) and smp ResNet encoders
    (list ``[input, stem, c2..c5]``). Returns the hook handle."""
    sizes = drops.get("_sizes", {})
    wanted = {k: v for k, v in drops.items() if k != "_sizes" and v}
    masks: dict[str, Tensor] = {}

    def mask_for(level: str, t: Tensor) -> Tensor:
        if level not in masks:
            channels = t.shape[1]
            if sizes.get(level, channels) != channels or max(wanted[level]) >= channels:
                raise DensesslError(f"finetune.drop_channels: stage {level} has {channels} "
                                    f"channels here but the artifact table was measured on "
                                    f"{sizes.get(level)}; probe this backbone")
            m = torch.ones(channels)
            m[wanted[level]] = 0
            masks[level] = m
        return masks[level].to(t.device, t.dtype)[None, :, None, None]

    def hook(module, inputs, output):
        if isinstance(output, dict):
            return {k: (v * mask_for(k, v) if k in wanted else v) for k, v in output.items()}
        out = list(output)
        for level, i in SMP_INDEX.items():
            if level in wanted:
                out[i] = out[i] * mask_for(level, out[i])
        return out

    return encoder.register_forward_hook(hook)


# ------------------------------------------------------------------ command


def load_images(data: str, n: int, image_size: int, channels: int, seed: int) -> Tensor:
    """``n`` images (seeded choice) from ``data``: a folder of images, a recipe YAML (its
    ``data`` source) or a registered source name with default options (e.g. ``synthetic``)."""
    from densessl.data.registry import SOURCES

    path = Path(data)
    if path.is_dir():
        from densessl.data.image_folder import ImageFolder

        dataset = ImageFolder(path, image_size=image_size, channels=channels)
    elif path.suffix in (".yaml", ".yml") and path.is_file():
        from densessl.build import build_source_dataset
        from densessl.recipe import load_recipe

        dataset = build_source_dataset(load_recipe(path, [f"data.image_size={image_size}"]))
    elif data in SOURCES:
        from densessl.build import build_source_dataset
        from densessl.recipe import load_recipe

        dataset = build_source_dataset(load_recipe(
            {"data": {"source": data, "image_size": image_size, "channels": channels,
                      "options": {"num_images": max(n, 8)} if data == "synthetic" else {}},
             "augment": {"view_size": min(64, image_size)}, "seed": seed + 1}))
    else:
        raise DensesslError(f"--data {data!r}: expected a folder of images, a recipe .yaml or "
                            f"a data source ({', '.join(sorted(SOURCES))})")
    if len(dataset) == 0:
        raise DensesslError(f"--data {data!r}: no images")
    # in file order: the probe's own seeded draws (which image is stamped, the halves) must
    # not repeat this choice's permutation, or "stamped" would mean "came early in the folder"
    pick = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    pick = pick.sort().values
    images = []
    for i in pick.tolist():
        item = dataset[i]
        if not isinstance(item, dict) or "image" not in item:
            raise DensesslError(f"--data {data!r}: items have no 'image' (got "
                                f"{sorted(item) if isinstance(item, dict) else type(item)})")
        images.append(item["image"].float())
    return torch.stack(images)


def run_probe_artifacts(weights: str | Path, data: str, artifact: str, out: str | Path, *,
                        n: int = 200, image_size: int = 96, seed: int = 0,
                        alpha: float = 0.05) -> dict:
    """``densessl probe-artifacts``: load ``encoder.pt`` (backbone and normalisation from the
    ``encoder.json`` / ``recipe.yaml`` next to it), probe, write the report. Returns the
    result (without the example images)."""
    import yaml

    from densessl.models.backbones import build_backbone, get_backbone_spec

    weights = Path(weights)
    if not weights.is_file():
        raise DensesslError(f"probe-artifacts: weights {str(weights)!r} not found")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an unreadable file is the user's to fix
        raise DensesslError(f"probe-artifacts: {weights} is not a torch state dict ({exc})"
                            ) from None
    info = read_side_json(weights.with_suffix(".json")) or {}  # damaged: an error naming it
    spec = get_backbone_spec(info["backbone"]) if info.get("backbone") else None
    if spec is not None and spec.family == "timm" and isinstance(state, dict):
        # a timm encoder.pt is identified by its encoder.json
        backbone, channels = info["backbone"], int(info.get("in_channels", 3))
    else:
        if not isinstance(state, dict) or "conv1.weight" not in state:
            raise DensesslError(f"probe-artifacts: {weights} is not a ResNet encoder in "
                                "torchvision layout (no conv1.weight)")
        backbone = info.get("backbone") or ("resnet50" if "layer1.0.conv3.weight" in state
                                            else "resnet18")
        channels = int(state["conv1.weight"].shape[1])
    mean, std = [0.5], [0.25]
    recipe_file = weights.parent / "recipe.yaml"
    if recipe_file.is_file():
        aug = (yaml.safe_load(recipe_file.read_text()) or {}).get("augment", {})
        mean = aug.get("mean", 0.5)
        std = aug.get("std", 0.25)
        mean = mean if isinstance(mean, list) else [mean]
        std = std if isinstance(std, list) else [std]
    encoder = build_backbone(backbone, channels)
    try:
        encoder.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
    except RuntimeError as exc:
        raise DensesslError(f"probe-artifacts: {weights} does not match {backbone} "
                            f"({str(exc).splitlines()[0]})") from None
    if artifact not in KINDS and not Path(artifact).is_file():
        raise DensesslError(f"--artifact {artifact!r}: expected one of {list(KINDS)} or an "
                            "existing .png file")
    images = load_images(data, n, image_size, channels, seed)
    result = probe_artifacts(encoder, images, artifact, mean=mean, std=std, seed=seed,
                             alpha=alpha)
    result["weights"] = str(weights.resolve())
    result["data"] = str(data)
    write_report(result, out)
    return result
