"""Which modules of an exported part (the FPN neck, the box head) pretraining actually trained.

Not every objective reads every FPN level (``build.pyramid_levels``): after dense-only
pretraining the p2 lateral and the p2/p4/p5 output convs never receive a gradient and keep
their random init. A detector must not take those as "pretrained" (and train them at the
transferred weights' reduced learning rate), so pretraining records, per module, whether any of
its parameters ever had a finite non-zero gradient (:class:`GradientRecord`), and
``encoder.json`` carries it as ``trained_modules`` (``{"neck": [...], "box_head": [...]}``).

Module names (:func:`module_units`) are prefixes of the part's state-dict keys: the neck's
``fpn.inner_blocks.1`` owns ``neck.pt``'s ``fpn.inner_blocks.1.*``, the box head's ``0`` owns
``box_head.pt``'s ``0.*``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from densessl.errors import DensesslError


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def module_units(module: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """The modules a record names, by state-dict prefix: ``module``'s children that hold
    parameters, a container child (``ModuleList`` / ``ModuleDict``, e.g. the FPN's
    ``inner_blocks``) as its elements; a module whose only parameter-holding child is a plain
    wrapper around everything (``FPNNeck.fpn``) is looked through.

    ``FPNNeck`` → ``fpn.inner_blocks.0`` … ``fpn.layer_blocks.3`` (``fpn.extra_blocks`` when it
    has parameters); torchvision's FPN → ``inner_blocks.0`` …; ``FastRCNNConvFCHead`` → ``0``,
    ``1``, ``2``, ``3`` (conv + BN), ``5`` (fc)."""
    children = [(n, c) for n, c in module.named_children() if _has_parameters(c)]
    own = any(True for _ in module.parameters(recurse=False))
    if len(children) == 1 and not own and not isinstance(children[0][1],
                                                         (nn.ModuleList, nn.ModuleDict)):
        name, child = children[0]
        return module_units(child, f"{prefix}{name}.")
    units: dict[str, nn.Module] = {}
    for name, child in children:
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            for sub, element in child.named_children():
                if _has_parameters(element):
                    units[f"{prefix}{name}.{sub}"] = element
        else:
            units[f"{prefix}{name}"] = child
    return units


def unit_of(key: str, units) -> str | None:
    """The unit (of ``units``' names) that owns state-dict key ``key``, or ``None``."""
    for unit in units:
        if key.startswith(unit + "."):
            return unit
    return None


def load_units(module: nn.Module, state: dict[str, Tensor], where: str) -> list[str]:
    """Load ``state`` (some of ``module``'s state dict) into ``module``, unit by unit
    (:func:`module_units`); units ``state`` has no key of keep their weights. Every key must
    belong to a unit of ``module`` and every unit it touches must be complete with the right
    shapes (a :class:`DensesslError` naming ``where`` otherwise). Returns the loaded units,
    in ``module``'s order."""
    from densessl.models.weights import load_encoder  # weights imports nothing of ours

    units = module_units(module)
    stray = sorted(k for k in state if unit_of(k, units) is None)
    if stray:
        raise DensesslError(f"{where}: weights do not match the model: unexpected {stray[:3]}")
    loaded = []
    for unit, sub in units.items():
        part = {k[len(unit) + 1:]: v for k, v in state.items() if k.startswith(unit + ".")}
        if part:
            load_encoder(sub, part, f"{where}, {unit}")
            loaded.append(unit)
    return loaded


class GradientRecord(nn.Module):
    """Per module of some parts (e.g. ``{"neck": encoder.neck, "box_head": head}``): has any of
    its parameters ever had a finite non-zero gradient?

    :meth:`observe` runs after each backward (before the optimiser step) and costs a few fused
    reductions on the device, no host read; :meth:`record` reads the flags (at save time).
    :meth:`state_dict_entry` / :meth:`load_entry` carry them through a checkpoint; a checkpoint
    without them (an older run) makes the record unknown (:meth:`record` → ``None``), since the
    steps before it were not observed.

    The flags are a non-persistent buffer (float 0 / 1: DDP broadcasts buffers, and every
    backend takes floats): they follow the module's device but stay out of its state dict
    (checkpoints of older runs still load strictly).
    """

    def __init__(self, parts: dict[str, nn.Module | None]) -> None:
        super().__init__()
        self.names: list[tuple[str, str]] = []
        params: list[list[Tensor]] = []
        for part, module in parts.items():
            if module is None:
                continue
            for unit, sub in module_units(module).items():
                self.names.append((part, unit))
                params.append([p for p in sub.parameters()])
        # a plain list: the tracked modules stay registered where they are, not here
        self._params = params
        self.register_buffer("seen", torch.zeros(len(self.names)), persistent=False)
        self.complete = True
        self._index: dict[tuple[int, ...], Tensor] = {}

    @torch.no_grad()
    def observe(self) -> None:
        grads, owner = [], []
        for i, params in enumerate(self._params):
            for p in params:
                if p.grad is not None:
                    grads.append(p.grad)
                    owner.append(i)
        if not grads:
            return
        key = tuple(owner)
        index = self._index.get(key)
        if index is None or index.device != self.seen.device:
            index = self._index[key] = torch.tensor(owner, device=self.seen.device)
        # max |g| per tensor: no overflow; NaN / inf (a step the guard or the scaler drops)
        # counts as no gradient
        peak = torch.stack(torch._foreach_norm(grads, float("inf"))).to(self.seen.device)
        hit = ((peak > 0) & peak.isfinite()).to(self.seen.dtype)
        step = torch.zeros_like(self.seen).index_add_(0, index, hit).clamp_(max=1)
        torch.maximum(self.seen, step, out=self.seen)

    def record(self) -> dict[str, list[str]] | None:
        """``{part: [trained module names]}`` (every part given, possibly with an empty list),
        or ``None`` when the record is incomplete (resumed from a checkpoint without it)."""
        if not self.complete:
            return None
        seen = [v > 0 for v in self.seen.tolist()]
        out: dict[str, list[str]] = {}
        for (part, unit), flag in zip(self.names, seen):
            out.setdefault(part, [])
            if flag:
                out[part].append(unit)
        return out

    def state_dict_entry(self) -> dict:
        return {"names": [list(n) for n in self.names],
                "seen": [v > 0 for v in self.seen.tolist()], "complete": self.complete}

    def load_entry(self, entry: dict | None) -> None:
        if not entry or [tuple(n) for n in entry.get("names", [])] != self.names:
            # an older checkpoint (or another model): the steps so far are unknown
            self.complete = False
            self.seen.zero_()
            return
        self.complete = bool(entry.get("complete", True))
        self.seen.copy_(torch.tensor([float(bool(v)) for v in entry["seen"]]))
