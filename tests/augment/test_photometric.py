"""Photometric augmentation works for any channel count, with the non-RGB switch."""

import pytest
import torch

from densessl.augment import ViewPhotometry


def flat_bands(channels, batch=4, size=16):
    # each band a constant, so a per-band brightness/contrast change is easy to read off
    values = torch.linspace(0.3, 0.7, channels)
    return values.view(1, channels, 1, 1).expand(batch, channels, size, size).clone()


def test_per_channel_jitter_changes_bands_independently():
    torch.manual_seed(0)
    views = flat_bands(13)
    photometry = ViewPhotometry(13, jitter_p=1.0, brightness=0.4, contrast=0.0, blur_p=0.0,
                                non_rgb="per_channel")
    out = photometry(views)
    shift = (out - views)[:, :, 0, 0]                  # B×13 brightness offsets
    assert out.shape == views.shape
    assert shift.abs().max() > 0.01                    # jitter happened
    assert shift.std(dim=1).min() > 1e-3               # and differs between bands


def test_skip_leaves_non_rgb_colours_alone():
    views = flat_bands(5)
    photometry = ViewPhotometry(5, jitter_p=1.0, blur_p=0.0, solarize_p=0.0, non_rgb="skip")
    torch.testing.assert_close(photometry(views), views)


def test_rgb_gets_colour_jitter_and_stays_in_range():
    torch.manual_seed(1)
    views = torch.rand(4, 3, 16, 16)
    out = ViewPhotometry(3, jitter_p=1.0, grayscale_p=0.0, blur_p=0.0)(views)
    assert not torch.allclose(out, views)
    assert out.min() >= 0 and out.max() <= 1


def test_unknown_switch_is_rejected():
    with pytest.raises(ValueError, match="non_rgb"):
        ViewPhotometry(4, non_rgb="sometimes")
