"""Starting weights read offline: ImageNet (``finetune.inits: imagenet``,
``model.init_weights: imagenet``) or any encoder / state dict file (``model.init_weights: PATH``).

ImageNet weights are the encoder a practitioner would otherwise start from: torchvision's
``ResNet{18,34,50}_Weights.IMAGENET1K_V1`` for ``resnet18/34/50``, the model's default pretrained
tag for ``timm:<name>``. densessl never downloads them. They are read from

1. ``model.weights_file`` (a local copy: the torchvision ``.pth``, a timm ``model.safetensors`` /
   ``pytorch_model.bin``, or any state dict of the architecture), else
2. the cache a download would have filled: ``torch.hub.get_dir()/checkpoints/<file>`` (what
   ``torchvision.models.resnet18(weights="IMAGENET1K_V1")`` finds already downloaded); for timm
   the Hugging Face hub cache (``timm/<name>.<tag>``) or, for older timm weights, the same torch
   hub folder.

Nothing found is a :class:`~densessl.errors.DensesslError` naming the file expected, the cache
path, the ``model.weights_file`` key and the one-line command that fetches it on a machine with
internet, never a silent random init.

Channels: ImageNet weights take 3 (RGB) inputs. For ``data.channels`` != 3 the first conv is
adapted as timm does (:func:`timm.models.adapt_input_conv`): 1 channel = the sum over RGB,
C > 3 = the RGB weights repeated cyclically and scaled by 3 / C; the record says so.

Normalisation: the pipeline normalises with the recipe's ``augment.mean`` / ``std``, which is
left as it is (ImageNet weights were trained on ImageNet mean / std of [0, 1] RGB,
:data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`); :func:`normalisation_note` says when the two
differ for a 3-channel ImageNet start, so a practitioner can set them (fine-tuning adapts to
either).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import Tensor

from densessl.errors import DensesslError
from densessl.models.backbones import get_backbone_spec
from densessl.models.weights import check_encoder_state, reference_state

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_TORCHVISION = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights",
                "resnet50": "ResNet50_Weights"}
_HF_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class ImagenetSource:
    """Where a backbone's ImageNet weights come from and where a download would have put them.

    Attributes:
        backbone: ``resnet18`` … or ``timm:<name>``.
        weights: what they are, e.g. ``torchvision ResNet18_Weights.IMAGENET1K_V1``.
        file_name: the file a download writes (``resnet18-f37072fd.pth``; for timm the
            Hugging Face file, ``model.safetensors``).
        cache: where the download would have put it, in the order searched.
        fetch: the one-line command that downloads it there on a machine with internet.
        url: where it is downloaded from.
    """

    backbone: str
    weights: str
    file_name: str
    cache: list[Path] = field(default_factory=list)
    fetch: str = ""
    url: str | None = None


def imagenet_source(backbone: str) -> ImagenetSource:
    """The ImageNet weights of ``backbone`` (found or not)."""
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    spec = get_backbone_spec(backbone)
    if spec.family != "timm":
        if backbone not in _TORCHVISION:
            raise DensesslError(f"model.backbone {backbone!r}: no ImageNet weights known")
        enum = getattr(torchvision.models, _TORCHVISION[backbone]).IMAGENET1K_V1
        name = enum.url.rsplit("/", 1)[-1]
        return ImagenetSource(
            backbone, f"torchvision {_TORCHVISION[backbone]}.IMAGENET1K_V1", name, [hub / name],
            f"python -c \"import torchvision; torchvision.models.{backbone}"
            f"(weights='IMAGENET1K_V1')\"", enum.url)
    from timm.models import get_pretrained_cfg

    name = spec.model_name
    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise DensesslError(f"model.backbone {backbone}: timm has no pretrained weights for "
                            f"{name!r}; use another backbone or model.init_weights: PATH")
    tag = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else name
    cache: list[Path] = []
    file_name = cfg.hf_hub_filename or _HF_FILES[0]
    if cfg.hf_hub_id:
        from huggingface_hub import constants

        repo = constants.HF_HUB_CACHE + "/models--" + cfg.hf_hub_id.replace("/", "--")
        cache += [Path(repo) / "snapshots" / "<revision>" / f
                  for f in ((cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HF_FILES)]
    if cfg.url:
        cache.append(hub / cfg.url.rsplit("/", 1)[-1])
        if not cfg.hf_hub_id:
            file_name = cfg.url.rsplit("/", 1)[-1]
    # timm downloads from the Hugging Face hub when the weights are there, else from the url
    return ImagenetSource(
        backbone, f"timm {tag}", file_name, cache,
        f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\"",
        f"https://huggingface.co/{cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url)


def _cached(source: ImagenetSource) -> Path | None:
    """The first cached copy of ``source`` on this machine (never downloads)."""
    spec = get_backbone_spec(source.backbone)
    if spec.family == "timm":
        from huggingface_hub import try_to_load_from_cache
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(spec.model_name)
        if cfg.hf_hub_id:
            for name in ((cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HF_FILES):
                found = try_to_load_from_cache(cfg.hf_hub_id, name)
                if isinstance(found, str) and Path(found).is_file():
                    return Path(found)
    return next((p for p in source.cache if "<revision>" not in p.parts and p.is_file()), None)


def missing_message(source: ImagenetSource, key: str) -> str:
    """How to provide ``source`` offline, in one line."""
    looked = " or ".join(str(p) for p in source.cache)
    if get_backbone_spec(source.backbone).family == "timm":
        where = "the cache above (as a download does)"
    else:
        where = f"{source.cache[0].parent}/"
    return (f"{key} needs the ImageNet weights of {source.backbone} ({source.weights}) and "
            f"densessl never downloads them: none found (model.weights_file is not set; no "
            f"{looked}). Set model.weights_file: PATH to a local copy of {source.file_name} "
            f"(or any {source.backbone} state dict), or put it into {where}; on a machine "
            f"with internet, {source.fetch} downloads it there"
            + (f" (from {source.url})" if source.url else "") + ", then copy it over")


def find_imagenet_file(backbone: str, weights_file: str | None, key: str) -> Path:
    """``model.weights_file`` if set (it must exist), else the cached download; a
    :class:`DensesslError` saying how to provide the file when there is none."""
    if weights_file:
        path = Path(weights_file).expanduser()
        if not path.is_file():
            source = imagenet_source(backbone)
            raise DensesslError(f"model.weights_file: {str(path)!r} not found ({key} reads the "
                                f"ImageNet weights of {backbone}, {source.weights}, from it: "
                                f"{source.file_name}; on a machine with internet, "
                                f"{source.fetch} downloads it into {source.cache[-1].parent})")
        return path
    source = imagenet_source(backbone)
    found = _cached(source)
    if found is None:
        raise DensesslError(missing_message(source, key))
    return found


def read_state_file(path: Path, where: str) -> dict[str, Tensor]:
    """A state dict of tensors from a ``.pt`` / ``.pth`` / ``.bin`` or ``.safetensors`` file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user error here
        raise DensesslError(f"{where}: cannot be read as a torch state dict ({exc})") from None
    if isinstance(state, dict) and "state_dict" in state:
        raise DensesslError(f"{where}: looks like a training checkpoint; pass the exported "
                            "encoder.pt (or a torchvision / timm state dict) instead")
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DensesslError(f"{where}: not a state dict of tensors")
    return state


def adapt_channels(state: dict[str, Tensor], backbone: str, in_channels: int
                   ) -> tuple[dict[str, Tensor], dict | None]:
    """3-channel (RGB) input convs of ``state`` adapted to ``in_channels`` with timm's
    :func:`~timm.models.adapt_input_conv` (1: sum over RGB; C > 3: RGB repeated cyclically,
    × 3 / C), and the record of what changed (``None``: nothing to adapt)."""
    if in_channels == 3:
        return state, None
    from timm.models import adapt_input_conv

    ref = reference_state(backbone, in_channels)
    state, keys = dict(state), []
    for key, want in ref.items():
        have = state.get(key)
        if (have is not None and have.ndim == 4 and want.ndim == 4 and have.shape != want.shape
                and have.shape[1] == 3 and want.shape[1] == in_channels
                and have.shape[0] == want.shape[0] and have.shape[2:] == want.shape[2:]):
            state[key] = adapt_input_conv(in_channels, have)
            keys.append(key)
    if not keys:
        return state, None
    return state, adapted_record(keys, in_channels)


def adapted_record(keys: list[str], in_channels: int) -> dict:
    rule = ("sum over the RGB weights" if in_channels == 1 else
            f"RGB weights repeated cyclically over {in_channels} channels, x 3/{in_channels}")
    return {"keys": keys, "from_channels": 3, "to_channels": in_channels,
            "rule": rule + " (timm adapt_input_conv)"}


def _timm_features_state(backbone: str, in_channels: int, path: Path, where: str
                         ) -> tuple[dict[str, Tensor], dict | None]:
    """A timm classification state dict (head, unflattened names) → the ``features_only``
    layout, loaded by timm itself (its checkpoint filter, first-conv adaptation, no head)."""
    import timm

    name = get_backbone_spec(backbone).model_name
    try:
        model = timm.create_model(name, pretrained=True, features_only=True, in_chans=in_channels,
                                  pretrained_cfg_overlay={"file": str(path)})
    except Exception as exc:  # noqa: BLE001 - any mismatch is the file's
        raise DensesslError(f"{where}: neither a {backbone} encoder (features_only layout) nor "
                            f"a timm {name} state dict timm can load "
                            f"({type(exc).__name__}: {str(exc)[:300]})") from None
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    first = model.pretrained_cfg.get("first_conv")
    first = [f"{k}.weight" for k in ([first] if isinstance(first, str) else first or [])]
    record = adapted_record(first, in_channels) if in_channels != 3 else None
    return state, record


def load_state(backbone: str, in_channels: int, path: Path, where: str
               ) -> tuple[dict[str, Tensor], dict | None]:
    """The encoder state (our key layout, ``in_channels`` inputs) in ``path``: an ``encoder.pt``,
    a torchvision ResNet state dict (``fc.*`` dropped) or a timm state dict; 3-channel weights
    adapted to ``in_channels`` (:func:`adapt_channels`). Returns it and the adaptation record."""
    raw = read_state_file(path, where)
    state = {k: v for k, v in raw.items() if not k.startswith("fc.")}
    state, adapted = adapt_channels(state, backbone, in_channels)
    try:
        check_encoder_state(state, backbone, in_channels, where)
    except DensesslError:
        if get_backbone_spec(backbone).family != "timm":
            raise
        state, adapted = _timm_features_state(backbone, in_channels, path, where)
        check_encoder_state(state, backbone, in_channels, where)
    return state, adapted


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def start_weights(backbone: str, in_channels: int, spec: str, weights_file: str | None,
                  key: str) -> tuple[dict[str, Tensor], dict]:
    """The encoder state ``spec`` names (``imagenet`` or a PATH) and its record: ``from``
    (imagenet / file), ``weights`` (for imagenet), ``file``, ``sha256`` and ``first_conv``
    (the channel adaptation, ``None`` when none). ``key`` names the recipe key in errors."""
    if spec == "imagenet":
        path = find_imagenet_file(backbone, weights_file, key)
        record = {"from": "imagenet", "weights": imagenet_source(backbone).weights}
        where = f"{key}: {path}"
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise DensesslError(f"{key}: {str(path)!r} not found (expected imagenet, null or "
                                "the path of an encoder.pt / torchvision / timm state dict)")
        record = {"from": "file"}
        where = f"{key}: {path}"
    state, adapted = load_state(backbone, in_channels, path, where)
    record.update(file=str(path), sha256=sha256(path), first_conv=adapted)
    return state, record


def init_weights_state(recipe) -> tuple[dict[str, Tensor] | None, dict]:
    """``model.init_weights`` of a pretraining recipe: the backbone state it starts from and
    the record for encoder.json / metrics.json (``{"from": "random"}`` for null)."""
    m = recipe.model
    if m.init_weights is None:
        return None, {"from": "random"}
    key = "model.init_weights" + (": imagenet" if m.init_weights == "imagenet" else "")
    return start_weights(m.backbone, recipe.data.channels, m.init_weights, m.weights_file, key)


def imagenet_state(recipe) -> tuple[dict[str, Tensor], dict]:
    """``finetune.inits: imagenet``: the recipe backbone's ImageNet state and its record."""
    return start_weights(recipe.model.backbone, recipe.data.channels, "imagenet",
                         recipe.model.weights_file, "finetune.inits: imagenet")


def normalisation_note(recipe) -> str | None:
    """A note for a 3-channel ImageNet start whose recipe normalises otherwise than ImageNet
    (the recipe's is kept: training adapts, but the first layers see shifted inputs at first);
    ``None`` when they match, for other channel counts and while mean / std are ``auto``."""
    a = recipe.augment
    if recipe.data.channels != 3 or "auto" in (a.mean, a.std):
        return None

    def three(v):
        return [float(v)] * 3 if isinstance(v, (int, float)) else [float(x) for x in v]

    mean, std = three(a.mean), three(a.std)
    if all(abs(x - y) < 1e-3 for x, y in zip(mean + std, IMAGENET_MEAN + IMAGENET_STD)):
        return None
    return (f"note: ImageNet weights expect ImageNet normalisation (mean {list(IMAGENET_MEAN)}, "
            f"std {list(IMAGENET_STD)} on [0, 1] RGB); the recipe's augment.mean {a.mean} / "
            f"std {a.std} is used as it is (set augment.mean / std to ImageNet's to match)")
