"""Online / momentum encoder pair (MoCo, He et al. 2020; BYOL, Grill et al. 2020)."""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.nn as nn
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import Tensor


def _detach(tree: Any) -> Any:
    if isinstance(tree, Tensor):
        return tree.detach()
    if isinstance(tree, dict):
        return {k: _detach(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_detach(v) for v in tree)
    return tree


class MomentumPair(nn.Module):
    """An online encoder and its exponential-moving-average twin.

    Both branches go through :meth:`encode`, so the key branch cannot silently run the online
    weights. BatchNorm of the momentum branch stays in train mode (batch statistics), as in MoCo.

    Args:
        online: the trained module; ``momentum`` starts as a deep copy with gradients off.
    """

    def __init__(self, online: nn.Module) -> None:
        super().__init__()
        self.online = online
        self.momentum = copy.deepcopy(online)
        deactivate_requires_grad(self.momentum)

    @torch.no_grad()
    def update(self, m: float) -> None:
        """``momentum ← m · momentum + (1 − m) · online`` for every parameter.

        Buffers (BN running statistics) are not averaged; the momentum branch keeps its own,
        which only matter at eval time.
        """
        update_momentum(self.online, self.momentum, m)

    def encode(self, x: Tensor, branch: Literal["online", "momentum"] = "online") -> Any:
        """Run ``x`` through one branch; the momentum branch runs without autograd and returns
        detached outputs (same structure as the wrapped module's output)."""
        if branch == "online":
            return self.online(x)
        if branch == "momentum":
            with torch.no_grad():
                return _detach(self.momentum(x))
        raise ValueError(f"unknown branch {branch!r}; valid: ['online', 'momentum']")

    def forward(self, x: Tensor, branch: Literal["online", "momentum"] = "online") -> Any:
        return self.encode(x, branch)


def cosine_momentum(step: int, max_steps: int, start: float = 0.99, end: float = 1.0) -> float:
    """Momentum rising from ``start`` to ``end`` on a half cosine (BYOL, Grill et al. 2020)."""
    return cosine_schedule(step, max_steps, start, end)
