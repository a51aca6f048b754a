import torch
from torch import nn

from densessl.models.split_batchnorm import SplitBatchNorm2d, convert_to_split_batchnorm


def test_each_group_is_normalised_by_its_own_statistics():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5) * torch.arange(1, 9).view(8, 1, 1, 1)
    split = SplitBatchNorm2d(3, groups=4).train()
    reference = nn.BatchNorm2d(3).train()
    out = split(x)
    for g in range(4):
        part = x[g * 2:(g + 1) * 2]
        torch.testing.assert_close(out[g * 2:(g + 1) * 2], reference(part), atol=1e-5, rtol=0)


def test_running_stats_average_groups_and_eval_is_plain_bn():
    torch.manual_seed(1)
    x = torch.randn(8, 3, 4, 4)
    split = SplitBatchNorm2d(3, groups=2, momentum=1.0).train()
    split(x)
    means = torch.stack([x[:4].mean((0, 2, 3)), x[4:].mean((0, 2, 3))]).mean(0)
    torch.testing.assert_close(split.running_mean, means, atol=1e-5, rtol=0)
    split.eval()
    plain = nn.BatchNorm2d(3).eval()
    plain.load_state_dict(split.state_dict())
    torch.testing.assert_close(split(x), plain(x))


def test_conversion_keeps_state_dict_keys():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    keys = set(model.state_dict())
    convert_to_split_batchnorm(model, 2)
    assert isinstance(model[1], SplitBatchNorm2d) and isinstance(model[2][0], SplitBatchNorm2d)
    assert set(model.state_dict()) == keys
