"""Sampling the bundled digits models: same noise for every run, so cached and full-compute images can be
compared image by image.

    from l2c_kernels import models
    bundle = models.load("dit-digits")
    images = models.sample(bundle, labels=range(10), steps=50, scheduler="ddim", cfg=4.0, seed=0)
    sampling.save_grid(images, "digits.png", nrow=10)

Images come back as ``[B, C, H, W]`` float32 in [-1, 1] (the models work in pixel space). Pass
``transformer=`` to sample with another module of the same signature, e.g. the one ``compile_schedule``
returns. Every model samples through the library's one loop (:meth:`~l2c_kernels.sampling.denoiser.Denoiser.run`)
with the denoiser :mod:`.denoisers` builds for it.
"""
from __future__ import annotations

import torch

from ..sampling.conditioning import denoiser_for
from ..sampling import SCHEDULERS, initial_noise, make_scheduler
from . import flux_digits
from .registry import BundledModel
from .registry import load as load_model


def timesteps_for(bundle_or_config, steps: int, scheduler: str = "ddim") -> list[float]:
    """The timesteps (in call order) the sampler passes to the transformer for ``steps`` steps:
    what a :class:`~l2c_kernels.Schedule` for that sampler must list. A flow-matching bundled model
    (``flux-digits``) gets the Euler flow-matching timesteps :func:`sample` uses (``scheduler`` ``"ddim"``,
    this function's default, or ``"flow-euler"``)."""
    if getattr(bundle_or_config, "is_flow_matching", False):
        _check_flow_sampler(bundle_or_config, scheduler)
        return flux_digits.timesteps_for(bundle_or_config, steps)
    cfg = bundle_or_config if isinstance(bundle_or_config, dict) else bundle_or_config.scheduler_config
    sc = make_scheduler(cfg, scheduler)
    sc.set_timesteps(steps)
    return [float(t) for t in sc.timesteps]


def _check_flow_sampler(bundle, scheduler: str) -> None:
    """A flow-matching bundled model samples with Euler flow matching only ("ddim" is this module's default name)."""
    if scheduler not in ("ddim", "flow-euler"):
        raise ValueError(f"{bundle.name} is a flow-matching model sampled with Euler flow matching; "
                         f"scheduler {scheduler!r} does not apply to it")


def _labels_or_prompts(bundle, labels, prompts):
    if prompts is not None:
        if not bundle.is_text_conditional:
            raise ValueError(f"{bundle.name} is class-conditional: pass labels, not prompts")
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of captions, not one string")
        return None, [str(p) for p in prompts]
    if labels is None:
        raise ValueError("pass labels (digit classes 0-9) or, for a text-conditional model, prompts")
    labels = [int(l) for l in (labels.tolist() if isinstance(labels, torch.Tensor) else labels)]
    bad = [l for l in labels if not 0 <= l <= 9]
    if bad:
        raise ValueError(f"labels must be digit classes 0-9, got {bad[:5]}")
    return labels, None


@torch.no_grad()
def sample(bundle, labels=None, prompts=None, steps: int = 50, scheduler: str = "ddim", cfg: float | None = None,
           seed: int = 0, transformer: torch.nn.Module | None = None, batch_size: int | None = None,
           progress: bool = True, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Sample digits from a bundled model (or its name) with classifier-free guidance.

    ``labels``: digit classes; ``prompts``: captions (text-conditional models only; default captions are made
    from ``labels``). ``cfg``: guidance scale (default: the model's recommended one; ``<= 1`` samples without
    guidance). ``scheduler``: ``ddim``, ``dpm++`` or ``euler`` (flow-matching models: Euler flow matching,
    ``"ddim"`` or ``"flow-euler"``). ``batch_size`` chunks the work; the noise of every sample is fixed by
    ``seed`` and its index (in pixel layout), so chunking does not change the images.
    """
    if isinstance(bundle, str):
        bundle = load_model(bundle)
    if not isinstance(bundle, BundledModel):
        raise TypeError(f"sample() takes a bundled model or its name, got {type(bundle).__name__}; "
                        "for a diffusers pipeline call the pipeline itself")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    flow = bundle.is_flow_matching
    if flow:
        _check_flow_sampler(bundle, scheduler)
    elif scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    labels, prompts = _labels_or_prompts(bundle, labels, prompts)
    if prompts is None and bundle.is_text_conditional:   # captions over the whole batch: chunking keeps them
        from .text_encoder import caption_for

        prompts, labels = [caption_for(v, i) for i, v in enumerate(labels)], None
    n = len(prompts) if prompts is not None else len(labels)
    if n == 0:
        raise ValueError("nothing to sample: labels/prompts is empty")
    cfg = bundle.recommended_cfg if cfg is None else float(cfg)
    tr = transformer if transformer is not None else bundle.transformer
    base = bundle.transformer
    size = bundle.image_size
    shape = (flux_digits.CHANNELS if flow else base.config.in_channels, size, size)
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
        den = denoiser_for(bundle, sl.stop - sl.start, cfg, None if flow else scheduler,
                           labels=None if labels is None else labels[sl],
                           prompts=None if prompts is None else list(prompts)[sl])
        x0 = flux_digits.pack(noise[sl]) if flow else noise[sl]
        x, _ = den.sample_with(tr, steps, x0, record=None if bar is None else (lambda s: bar.update(1)))
        out.append((flux_digits.unpack(x, size) if flow else x).cpu())
    if bar is not None:
        bar.close()
    return torch.cat(out)
