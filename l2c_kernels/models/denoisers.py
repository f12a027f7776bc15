"""The bundled digits models as one more registered case of the library's denoisers
(:func:`~l2c_kernels.sampling.conditioning.register_pipeline`), and their names as models the library loads by name
(:func:`~l2c_kernels.sampling.conditioning.register_model_names`).

They sample in pixel space: labels are digits 0-9 (null class from the config), captions come from
the caption encoder bundled with ``pixart-digits`` and ``flux-digits``, and final samples are clamped
to the pixel range [-1, 1]. The DDPM models (``dit-digits``, ``pixart-digits``) default to the clipped
DDIM of their noise schedule; ``flux-digits`` is sampled as ``models.sample`` samples it: Euler flow
matching over FluxPipeline's sigmas on packed 2x2 tokens, the timestep passed as ``t / 1000``, and
classifier-free guidance in one batch ``[uncond; cond]`` at the model's recommended scale. Nothing here
is used for other models.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..sampling.conditioning import Request, class_labels_for, register_model_names, register_pipeline
from ..sampling.denoiser import Denoiser
from ..sampling.mmdit_conditions import PipelineDenoiser
from ..sampling.schedulers import resolve_scheduler, scheduler_from_name
from . import flux_digits
from .registry import MODEL_NAMES, load
from .text_encoder import caption_for

DIGITS = 10


def _digit_labels(req: Request, n: int, seed: int) -> list[int]:
    if req.labels is None:  # stratified: every run of ten consecutive samples holds each class once, in random order
        g = torch.Generator().manual_seed(int(seed))
        draws = [torch.randperm(DIGITS, generator=g) for _ in range(-(-n // DIGITS))]
        return torch.cat(draws)[:n].tolist() if draws else []
    labels = [int(v) for v in req.labels]
    bad = [v for v in labels if not 0 <= v < DIGITS]
    if bad:
        raise ValueError(f"labels must be digit classes 0-9, got {bad[:5]}")
    return labels


def _check_size(bundle, req: Request, side: int) -> None:
    if req.height is not None or req.width is not None:
        if (req.height or side, req.width or side) != (side, side):
            raise ValueError(f"{bundle.name} samples {side}x{side} images; got height={req.height}, width={req.width}")


def _captions(req: Request) -> list[str]:
    if req.prompts is not None:
        return [str(p) for p in req.prompts]
    return [caption_for(v, i) for i, v in enumerate(_digit_labels(req, req.num_samples, req.seed))]


def _flux_digits_timesteps(sched, steps: int, tokens: int) -> dict:
    """FluxPipeline's sigmas ``linspace(1, 1/steps, steps)``, as ``flux_digits.set_timesteps`` sets them."""
    import numpy as np

    return dict(sigmas=np.linspace(1.0, 1.0 / steps, steps).tolist())


@dataclass
class FluxDigitsDenoiser(PipelineDenoiser):
    """flux-digits' packed ``(64 tokens, 4)`` latents; the starting noise of sample ``i`` is ``sampling.initial_noise``'s
    pixel noise ``pixel_shape`` packed 2x2, so ``noise(seed)`` is what ``models.sample`` starts from with that seed."""

    pixel_shape: tuple = ()

    def noise(self, seed: int, num_samples: int | None = None) -> torch.Tensor:
        from ..sampling import initial_noise

        return flux_digits.pack(initial_noise(num_samples or self.num_samples, self.pixel_shape, seed))


def flux_digits_denoiser(bundle, req: Request) -> Denoiser:
    """``flux-digits``: Euler flow matching over FluxPipeline's sigmas, CFG in one batch ``[uncond; cond]``."""
    tr = bundle.transformer
    cfg = float(req.guidance_scale if req.guidance_scale is not None else bundle.recommended_cfg)
    size = bundle.image_size
    _check_size(bundle, req, size)
    factory = resolve_scheduler(flux_digits.make_scheduler(bundle), req.scheduler, bundle.name)
    prompts = _captions(req)
    if not prompts:
        raise ValueError("nothing to sample: the prompts (or labels) are empty, or num_samples is 0")
    args = flux_digits.conditions(bundle, prompts, cfg)
    tokens = (size // 2) ** 2
    dtype = tr.dtype
    redraw = None
    if req.labels is None and req.prompts is None:
        redraw = lambda seed: flux_digits_denoiser(bundle, replace(req, seed=seed))  # noqa: E731
    den = FluxDigitsDenoiser(tr, args, (tokens, int(tr.config.in_channels)), factory, cfg, len(prompts),
                             output_range=(-1.0, 1.0), text_tokens=int(args["encoder_hidden_states"].shape[1]),
                             patch_size=1, tokens=tokens, timestep_rule=_flux_digits_timesteps,
                             model_timestep=lambda t: (t / 1000).to(dtype),  # as flux_digits.sample
                             redraw=redraw, info=dict(model=bundle.name, prompts=prompts),
                             pixel_shape=(flux_digits.CHANNELS, size, size))
    den.info["sampler"] = den.sampler(1)
    return den


def bundled_denoiser(bundle, req: Request) -> Denoiser:
    if bundle.is_flow_matching:
        return flux_digits_denoiser(bundle, req)
    tr = bundle.transformer
    cfg = float(req.guidance_scale if req.guidance_scale is not None else bundle.recommended_cfg)
    base = scheduler_from_name("ddim", dict(bundle.scheduler_config))
    factory = resolve_scheduler(base, req.scheduler or "ddim", bundle.name)
    dev = tr.device
    shape = (tr.config.in_channels, tr.config.sample_size, tr.config.sample_size)
    _check_size(bundle, req, int(tr.config.sample_size))
    text_tokens = 0
    if bundle.text_encoder is None:
        labels = _digit_labels(req, req.num_samples, req.seed)
        _, null = class_labels_for(tr, labels, len(labels), req.seed, bundle.name)
        cond = torch.tensor(labels, device=dev)
        args = dict(class_labels=torch.cat([torch.full_like(cond, null), cond]) if cfg > 1 else cond)
        n, info = len(labels), dict(model=bundle.name, labels=labels)
    else:
        prompts = req.prompts
        if prompts is None:
            lab = _digit_labels(req, req.num_samples, req.seed)
            prompts = [caption_for(v, i) for i, v in enumerate(lab)]
        caps = ([""] * len(prompts) + list(prompts)) if cfg > 1 else list(prompts)
        enc, mask = bundle.text_encoder.encode(caps, device=dev, dtype=tr.dtype)
        args = dict(encoder_hidden_states=enc, encoder_attention_mask=mask,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
        text_tokens = int(enc.shape[1])
        n, info = len(prompts), dict(model=bundle.name, prompts=list(prompts))
    redraw = None
    if req.labels is None and req.prompts is None:
        redraw = lambda seed: bundled_denoiser(bundle, replace(req, seed=seed))  # noqa: E731
    return Denoiser(tr, args, shape, factory, cfg, n, output_range=(-1.0, 1.0), text_tokens=text_tokens,
                    patch_size=int(tr.config.patch_size), redraw=redraw, info=info)


register_pipeline("BundledModel", bundled_denoiser)
register_model_names(MODEL_NAMES, load)
