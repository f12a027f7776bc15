"""Noise, samplers and image grids the library and its examples share.

    from l2c_kernels import sampling
    sampling.save_grid(images, "digits.png", nrow=10)

Sampling the bundled digits models lives with them (:func:`l2c_kernels.models.sample`); every model, bundled or
not, samples through the one loop, :meth:`l2c_kernels.sampling.denoiser.Denoiser.run`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

#: Sampler names accepted everywhere (``l2c --scheduler``, :func:`make_scheduler`).
SCHEDULERS = ("ddim", "dpm++", "euler")


def make_scheduler(scheduler_config: dict, name: str = "ddim"):
    """A fresh diffusers scheduler of kind ``name`` (``ddim``, ``dpm++`` = DPM-Solver++(2M) multistep,
    ``euler``) for a model trained with the noise schedule ``scheduler_config``.

    ``ddim`` is a :class:`diffusers.DDIMScheduler` whose step re-derives the noise from the clipped
    clean-image estimate when the noise schedule clips samples (as the bundled pixel-space models'
    does); see ``l2c_kernels.sampling.schedulers.clipped_ddim_class``."""
    from .schedulers import scheduler_from_name

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return scheduler_from_name(name, scheduler_config)


def initial_noise(num_samples: int, shape: Sequence[int], seed: int) -> torch.Tensor:
    """The starting noise of sample ``i`` depends only on ``seed`` and ``i`` (not on batch chunking)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn((num_samples, *shape), generator=g)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images to uint8 [0, 255]."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(images: torch.Tensor, path, nrow: int = 10, scale: int = 4, pad: int = 2) -> Path:
    """Write ``[B, C, H, W]`` images in [-1, 1] as a PNG grid (``nrow`` per row, upscaled ``scale`` x)."""
    from PIL import Image

    imgs = to_uint8(images.detach().float().cpu())
    b, c, h, w = imgs.shape
    if c not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {c}")
    rows = (b + nrow - 1) // nrow
    H, W = h * scale, w * scale
    canvas = torch.full((c, rows * (H + pad) + pad, nrow * (W + pad) + pad), 255, dtype=torch.uint8)
    for i in range(b):
        r, k = divmod(i, nrow)
        tile = imgs[i].repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        canvas[:, pad + r * (H + pad): pad + r * (H + pad) + H, pad + k * (W + pad): pad + k * (W + pad) + W] = tile
    arr = canvas.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[:, :, 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
