"""PSNR / SSIM against known values, and the bundled digit classifier on real digits."""
from __future__ import annotations

import math

import pytest
import torch

from l2c_kernels import metrics
from l2c_kernels.models import classifier  # noqa: E402


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


def _ssim_loop(a: torch.Tensor, b: torch.Tensor, data_range: float, window: int, sigma: float) -> float:
    """SSIM written out from Wang et al. (2004), window by window in float64 Python loops: Gaussian
    weights w (sum 1), weighted means, population (co)variances, K1 = 0.01, K2 = 0.03, mean over every
    valid window position of every image and channel."""
    g = [math.exp(-((i - (window - 1) / 2) ** 2) / (2 * sigma ** 2)) for i in range(window)]
    w = [[gi * gj for gj in g] for gi in g]
    tot = sum(map(sum, w))
    w = [[v / tot for v in row] for row in w]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    a, b = a.double().tolist(), b.double().tolist()
    vals = []
    for im_a, im_b in zip(a, b):
        for ch_a, ch_b in zip(im_a, im_b):
            h, wd = len(ch_a), len(ch_a[0])
            for y in range(h - window + 1):
                for x in range(wd - window + 1):
                    cells = [(w[i][j], ch_a[y + i][x + j], ch_b[y + i][x + j]) for i in range(window) for j in range(window)]
                    ma = sum(k * p for k, p, _ in cells)
                    mb = sum(k * q for k, _, q in cells)
                    va = sum(k * (p - ma) ** 2 for k, p, _ in cells)
                    vb = sum(k * (q - mb) ** 2 for k, _, q in cells)
                    cov = sum(k * (p - ma) * (q - mb) for k, p, q in cells)
                    vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return sum(vals) / len(vals)


@pytest.mark.parametrize("noise", [0.05, 0.3, 1.0])
def test_ssim_equals_the_definition_written_out(noise):
    """metrics.ssim (convolutions) against the window-by-window definition: the same float64 sums in
    another order, so equal to ~1e-15; 1e-12 allows for it."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, 12, 12, generator=g) * 2 - 1
    y = (x + noise * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    got = metrics.ssim(x, y)
    assert got == pytest.approx(_ssim_loop(x, y, 2.0, 7, 1.5), abs=1e-12)
    assert metrics.ssim(x, y, data_range=1.0, window=5, sigma=1.0) == pytest.approx(
        _ssim_loop(x, y, 1.0, 5, 1.0), abs=1e-12)


def test_ssim_of_constant_images_is_known():
    """Two constant images 0 and c: zero variances, so SSIM = C1 / (c^2 + C1) exactly, C1 = (0.01 * 2)^2."""
    c = 0.5
    c1 = (0.01 * 2.0) ** 2
    expected = c1 / (c ** 2 + c1)  # 0.0015974...
    got = metrics.ssim(torch.zeros(1, 1, 16, 16), torch.full((1, 1, 16, 16), c))
    assert got == pytest.approx(expected, rel=1e-12)
    # a contrast flip b = -a: per window (C1 - 2 mu^2)(C2 - 2 var) / ((2 mu^2 + C1)(2 var + C2)), close to -1
    # for a checkerboard (its 7x7 window means are small but not zero)
    pattern = torch.tensor([[1.0, -1.0] * 8, [-1.0, 1.0] * 8] * 8).reshape(1, 1, 16, 16) * 0.5
    assert metrics.ssim(pattern, -pattern) == pytest.approx(_ssim_loop(pattern, -pattern, 2.0, 7, 1.5), abs=1e-12)
    assert -1.0 < metrics.ssim(pattern, -pattern) < -0.95


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(torch.zeros(2, 1, 16, 16), torch.zeros(3, 1, 16, 16))


def test_classifier_reads_real_digits():
    from l2c_kernels.models.digits_data import load_digits_tensor

    x, y = load_digits_tensor(16)
    acc = classifier.class_accuracy(x[:400], y[:400])
    assert acc > 0.97
    with pytest.raises(ValueError, match="labels"):
        classifier.class_accuracy(x[:4], y[:3])
