"""Split BatchNorm: simulate multi-device BN on one device (MoCo, He et al. 2020, §3.3).

With plain BN on one device, the momentum encoder's batch statistics leak which samples are in
the batch, and contrastive training can "cheat" through them. MoCo shuffles the key batch across
devices; on one device, normalising each of ``groups`` sub-batches separately (after shuffling
the keys, see :meth:`DensePretraining` with ``model.key_bn: split``) has the same effect.
"""

from __future__ import annotations

import copy

import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch import Tensor, nn


# Not lightly's SplitBatchNorm: it stores C×groups running statistics, so its checkpoints do not
# load into a plain BatchNorm2d ResNet; this one keeps C-sized buffers and BatchNorm2d's keys.
class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d computing statistics over ``groups`` equal sub-batches in training mode.

    Running statistics are the average over groups, so evaluation behaves like BatchNorm2d and
    the state dict keys are unchanged (weights load into a plain ResNet).
    """

    def __init__(self, num_features: int, groups: int = 4, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.groups <= 1 or x.shape[0] % self.groups:
            return super().forward(x)
        return _split_batch_norm(self, x, self.groups)


def _split_batch_norm(bn: nn.BatchNorm2d, x: Tensor, g: int) -> Tensor:
    """Training-mode batch norm of ``x`` with statistics per each of ``g`` sub-batches;
    ``bn``'s running statistics become the mean over groups."""
    b, c, h, w = x.shape
    # Sub-batch i (samples [i*b/g, (i+1)*b/g)) becomes channels [i*C, (i+1)*C) of a batch
    # of b/g: one BN call, per-group statistics.
    x = x.view(g, b // g, c, h, w).transpose(0, 1).reshape(b // g, g * c, h, w)
    running_mean = bn.running_mean.repeat(g)
    running_var = bn.running_var.repeat(g)
    out = F.batch_norm(x, running_mean, running_var, bn.weight.repeat(g),
                       bn.bias.repeat(g), True, bn.momentum or 0.1, bn.eps)
    bn.running_mean.copy_(running_mean.view(g, c).mean(0))
    bn.running_var.copy_(running_var.view(g, c).mean(0))
    bn.num_batches_tracked += 1
    return out.view(b // g, g, c, h, w).transpose(0, 1).reshape(b, c, h, w)


class SplitBatchNormAct2d(BatchNormAct2d):
    """:class:`SplitBatchNorm2d` for timm's BatchNormAct2d (BN, then dropout and activation in
    one module, used by EfficientNet, RegNet, MobileNetV3, ...): split statistics, then the
    module's own dropout and activation (replacing it by a plain BN would drop them)."""

    groups = 1

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.groups <= 1 or x.shape[0] % self.groups:
            return super().forward(x)
        return self.act(self.drop(_split_batch_norm(self, x, self.groups)))


def convert_to_split_batchnorm(module: nn.Module, groups: int) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` (in place) by a SplitBatchNorm2d with the same
    parameters and buffers; timm's BatchNormAct2d by its split twin (same activation).

    Any other BatchNorm2d subclass is a ValueError: it may compute more than BN, which a
    plain replacement would silently drop. LayerNorm / GroupNorm models (e.g. ConvNeXt) have
    no batch statistics to leak and are left alone."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            split = SplitBatchNorm2d(child.num_features, groups, eps=child.eps,
                                     momentum=child.momentum, affine=child.affine,
                                     track_running_stats=child.track_running_stats)
            split.load_state_dict(child.state_dict())
            split.to(child.weight.device if child.weight is not None else "cpu")
            setattr(module, name, split)
        elif type(child) is BatchNormAct2d:
            # the same module (weights, buffers, dropout, activation), split statistics
            split = copy.deepcopy(child)
            # no constructor call: BatchNormAct2d's signature varies across timm versions
            split.__class__ = SplitBatchNormAct2d
            split.groups = groups
            setattr(module, name, split)
        elif isinstance(child, nn.BatchNorm2d) and not isinstance(
                child, (SplitBatchNorm2d, SplitBatchNormAct2d)):
            raise ValueError(f"model.key_bn: split: cannot convert {name} "
                             f"({type(child).__module__}.{type(child).__name__}), a BatchNorm2d "
                             "subclass that may compute more than BN; use key_bn: shuffle")
        else:
            convert_to_split_batchnorm(child, groups)
    return module
