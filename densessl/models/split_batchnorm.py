"""Split BatchNorm: simulate multi-device BN on one device (MoCo, He et al. 2020, §3.3).

With plain BN on one device, the momentum encoder's batch statistics leak which samples are in
the batch, and contrastive training can "cheat" through them. MoCo shuffles the key batch across
devices; on one device, normalising each of ``groups`` sub-batches separately (after shuffling
the keys, see :meth:`DensePretraining` with ``model.key_bn: split``) has the same effect.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d computing statistics over ``groups`` equal sub-batches in training mode.

    Running statistics are the average over groups, so evaluation behaves like BatchNorm2d and
    the state dict keys are unchanged (weights load into a plain ResNet).
    """

    def __init__(self, num_features: int, groups: int = 4, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        if not self.training or self.groups <= 1 or b % self.groups:
            return super().forward(x)
        g = self.groups
        # Sub-batch i (samples [i*b/g, (i+1)*b/g)) becomes channels [i*C, (i+1)*C) of a batch
        # of b/g: one BN call, per-group statistics.
        x = x.view(g, b // g, c, h, w).transpose(0, 1).reshape(b // g, g * c, h, w)
        running_mean = self.running_mean.repeat(g)
        running_var = self.running_var.repeat(g)
        out = F.batch_norm(x, running_mean, running_var, self.weight.repeat(g),
                           self.bias.repeat(g), True, self.momentum or 0.1, self.eps)
        self.running_mean.copy_(running_mean.view(g, c).mean(0))
        self.running_var.copy_(running_var.view(g, c).mean(0))
        self.num_batches_tracked += 1
        return out.view(b // g, g, c, h, w).transpose(0, 1).reshape(b, c, h, w)


def convert_to_split_batchnorm(module: nn.Module, groups: int) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` (in place) by a SplitBatchNorm2d with the same
    parameters and buffers."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm2d):
            split = SplitBatchNorm2d(child.num_features, groups, eps=child.eps,
                                     momentum=child.momentum, affine=child.affine,
                                     track_running_stats=child.track_running_stats)
            split.load_state_dict(child.state_dict())
            split.to(child.weight.device if child.weight is not None else "cpu")
            setattr(module, name, split)
        else:
            convert_to_split_batchnorm(child, groups)
    return module
