"""The handwritten-digits data the bundled models are trained and evaluated on.

scikit-learn ships 1,797 8x8 digits (values 0..16). They are upsampled bilinearly to the
model resolution and mapped to [-1, 1], the pixel range the bundled diffusion models use.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def load_digits_tensor(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All sklearn digits as images ``[n, 1, size, size]`` in [-1, 1] and labels ``[n]``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1) * 2 - 1
    y = torch.tensor(d.target, dtype=torch.long)
    return x, y


def augment(x: torch.Tensor, generator: torch.Generator | None = None, max_shift: int = 1) -> torch.Tensor:
    """Light augmentation: a random shift of up to ``max_shift`` pixels per image (border = background)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(n, 1, h, w + 2 * max_shift)
    out = torch.gather(pad, 2, rows)
    cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, 1, h, w)
    return torch.gather(out, 3, cols)
