"""PSNR / SSIM against known values, and the bundled digit classifier on real digits."""
from __future__ import annotations

import math

import pytest
import torch

from l2c_kernels import metrics


def test_psnr_of_identical_images_is_inf():
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    assert metrics.psnr(x, x.clone()) == math.inf


def test_psnr_of_known_error():
    x = torch.zeros(2, 1, 16, 16)
    y = x + 0.1  # MSE 0.01, range 2 -> 10 log10(4 / 0.01) = 26.0206 dB
    assert metrics.psnr(x, y) == pytest.approx(10 * math.log10(400), abs=1e-6)  # 0.1 is inexact in float32
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(64, 1, 16, 16, generator=g) * 0.05
    expected = 10 * math.log10(4 / float((noise.double() ** 2).mean()))
    assert metrics.psnr(torch.zeros(64, 1, 16, 16), noise) == pytest.approx(expected, rel=1e-9)
    assert metrics.psnr(x, y, data_range=1.0) == pytest.approx(20.0, abs=1e-6)


def test_ssim_identity_and_ordering():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 16, 16, generator=g) * 2 - 1
    assert metrics.ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    small = metrics.ssim(x, (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1))
    large = metrics.ssim(x, (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(-1, 1))
    assert 1.0 > small > large
    # a constant shift of c: luminance term only, (2 mu (mu+c) + C1) / (mu^2 + (mu+c)^2 + C1) < 1
    assert metrics.ssim(torch.zeros(1, 1, 16, 16), torch.full((1, 1, 16, 16), 0.5)) < 0.5


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(torch.zeros(2, 1, 16, 16), torch.zeros(3, 1, 16, 16))


def test_classifier_reads_real_digits():
    from l2c_kernels.models.digits_data import load_digits_tensor

    x, y = load_digits_tensor(16)
    acc = metrics.class_accuracy(x[:400], y[:400])
    assert acc > 0.97
    with pytest.raises(ValueError, match="labels"):
        metrics.class_accuracy(x[:4], y[:3])
