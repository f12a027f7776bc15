"""Sampling the bundled models with diffusers schedulers: same noise for every run, so cached and
full-compute images can be compared image by image.

    from l2c_kernels import models, sampling
    bundle = models.load("dit-digits")
    images = sampling.sample(bundle, labels=range(10), steps=50, scheduler="ddim", cfg=4.0, seed=0)
    sampling.save_grid(images, "digits.png", nrow=10)

Images come back as ``[B, C, H, W]`` float32 in [-1, 1] (the models work in pixel space). Pass
``transformer=`` to sample with another module of the same signature, e.g. the one
``compile_schedule`` returns.
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
    does); see ``l2c_kernels.learn.schedulers.clipped_ddim_class``."""
    from .learn.schedulers import scheduler_from_name

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return scheduler_from_name(name, scheduler_config)


def timesteps_for(bundle_or_config, steps: int, scheduler: str = "ddim") -> list[float]:
    """The timesteps (in call order) the sampler passes to the transformer for ``steps`` steps:
    what a :class:`~l2c_kernels.Schedule` for that sampler must list. A flow-matching bundled model
    (``flux-digits``) gets the Euler flow-matching timesteps :func:`sample` uses (``scheduler`` ``"ddim"``,
    this function's default, or ``"flow-euler"``)."""
    if getattr(bundle_or_config, "is_flow_matching", False):
        _check_flow_sampler(bundle_or_config, scheduler)
        from .models import flux_digits

        return flux_digits.timesteps_for(bundle_or_config, steps)
    cfg = bundle_or_config if isinstance(bundle_or_config, dict) else bundle_or_config.scheduler_config
    sc = make_scheduler(cfg, scheduler)
    sc.set_timesteps(steps)
    return [float(t) for t in sc.timesteps]


def initial_noise(num_samples: int, shape: Sequence[int], seed: int) -> torch.Tensor:
    """The starting noise of sample ``i`` depends only on ``seed`` and ``i`` (not on batch chunking)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn((num_samples, *shape), generator=g)


def _check_flow_sampler(bundle, scheduler: str) -> None:
    """A flow-matching bundled model samples with Euler flow matching only ("ddim" is this module's default name)."""
    if scheduler not in ("ddim", "flow-euler"):
        raise ValueError(f"{bundle.name} is a flow-matching model sampled with Euler flow matching; "
                         f"scheduler {scheduler!r} does not apply to it")


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


@torch.no_grad()
def sample(bundle, labels=None, prompts=None, steps: int = 50, scheduler: str = "ddim", cfg: float | None = None,
           seed: int = 0, transformer: torch.nn.Module | None = None, batch_size: int | None = None,
           progress: bool = True, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Sample digits from a bundled model (or its name) with classifier-free guidance.

    ``labels``: digit classes (both models); ``prompts``: captions (``pixart-digits`` only; default
    captions are made from ``labels``). ``cfg``: guidance scale (default: the model's recommended
    one; ``<= 1`` samples without guidance). ``batch_size`` chunks the work; the noise of every
    sample is fixed by ``seed`` and its index, so chunking does not change the images.
    """
    from .learn.conditioning import denoiser_for
    from .models import BundledModel
    from .models import load as load_model

    if isinstance(bundle, str):
        bundle = load_model(bundle)
    if not isinstance(bundle, BundledModel):
        raise TypeError(f"sample() takes a bundled model or its name, got {type(bundle).__name__}; "
                        "for a diffusers pipeline call the pipeline itself")
    _check_steps(steps)
    if bundle.is_flow_matching:  # flux-digits: Euler flow matching, as FluxPipeline samples it
        _check_flow_sampler(bundle, scheduler)
        from .models import flux_digits

        return flux_digits.sample(bundle, labels=labels, prompts=prompts, steps=steps, cfg=cfg, seed=seed,
                                  transformer=transformer, batch_size=batch_size, progress=progress, noise=noise)
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if prompts is not None and not bundle.is_text_conditional:
        raise ValueError(f"{bundle.name} is class-conditional: pass labels, not prompts")
    if labels is None and prompts is None:
        raise ValueError("pass labels (digit classes 0-9) or, for pixart-digits, prompts")
    if labels is not None:
        labels = [int(l) for l in (labels.tolist() if isinstance(labels, torch.Tensor) else labels)]
        bad = [l for l in labels if not 0 <= l <= 9]
        if bad:
            raise ValueError(f"labels must be digit classes 0-9, got {bad[:5]}")
    n = len(prompts) if prompts is not None else len(labels)
    cfg = bundle.recommended_cfg if cfg is None else float(cfg)
    tr = transformer if transformer is not None else bundle.transformer
    base = bundle.transformer
    shape = (base.config.in_channels, base.config.sample_size, base.config.sample_size)
    if noise is None:
        noise = initial_noise(n, shape, seed)
    elif tuple(noise.shape) != (n, *shape):
        raise ValueError(f"noise must have shape {(n, *shape)}, got {tuple(noise.shape)}")
    bs = batch_size or n
    out = []
    chunks = list(range(0, n, bs))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps * len(chunks), desc=f"sampling {bundle.name}", unit="step", leave=False)
    for start in chunks:
        sl = slice(start, min(n, start + bs))
        den = denoiser_for(bundle, sl.stop - sl.start, cfg, scheduler,
                           labels=None if labels is None else labels[sl],
                           prompts=None if prompts is None else list(prompts)[sl])
        x, _ = den.sample_with(tr, steps, noise[sl], record=None if bar is None else (lambda s: bar.update(1)))
        out.append(x.cpu())
    if bar is not None:
        bar.close()
    return torch.cat(out)


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
