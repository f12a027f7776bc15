"""Image metrics for cached vs full-compute samples (the digits classifier lives with the bundled models).

Images are ``[B, C, H, W]`` tensors in [-1, 1] (``data_range`` 2) unless said otherwise.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _pair(a: torch.Tensor, b: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(f"{name} takes two tensors")
    if a.shape != b.shape:
        raise ValueError(f"{name}: images must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return a.detach().double().cpu(), b.detach().double().cpu()


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = _pair(a, b, "mse")
    return float(((a - b) ** 2).mean())


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB over the whole batch: ``10 log10(range^2 / MSE)``; ``inf`` for
    identical images."""
    m = mse(a, b)
    if m == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range ** 2 / m)


def psnr_per_image(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    a, b = _pair(a, b, "psnr_per_image")
    m = ((a - b) ** 2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range ** 2 / m)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, window: int = 7, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004) with a ``window`` x ``window`` Gaussian window
    (7 suits the 16x16 digits; images smaller than the window use the whole image), K1=0.01, K2=0.03."""
    a, b = _pair(a, b, "ssim")
    if a.dim() != 4:
        raise ValueError(f"ssim expects [B, C, H, W] images, got shape {tuple(a.shape)}")
    c = a.shape[1]
    window = min(window, a.shape[2], a.shape[3])
    w = _gaussian_window(window, sigma).expand(c, 1, window, window).contiguous()
    conv = lambda t: F.conv2d(t, w, groups=c)  # noqa: E731
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = conv(a), conv(b)
    saa = conv(a * a) - mu_a ** 2
    sbb = conv(b * b) - mu_b ** 2
    sab = conv(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
    return float(s.mean())
