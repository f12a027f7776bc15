"""Denoisers for the flow-matching MMDiT pipelines: ``StableDiffusion3Pipeline``, ``FluxPipeline``, ``WanPipeline``.

Each builder reproduces what the pipeline's ``__call__`` does before its denoising loop, with the
pipeline's own components (registered with :func:`~l2c_kernels.sampling.conditioning.register_pipeline`):

- **SD3**: CLIP-L + CLIP-G + T5 prompts through ``pipe.encode_prompt`` (negative prompt ``""``),
  ``pooled_projections``, classifier-free guidance in one batch ``[uncond; cond]``, latents
  ``(16, H/8, W/8)``; timesteps from the scheduler's shift (``mu`` from the image's token count when
  the scheduler has dynamic shifting, as the pipeline computes it).
- **Flux**: CLIP pooled + T5 prompts, *packed* latents ``((H/16)(W/16), 64)`` with the RoPE ids
  ``img_ids`` / ``txt_ids`` the pipeline makes, the distilled guidance embedding (Flux.1-dev:
  ``guidance = guidance_scale``), the timestep passed as ``t / 1000``, and the
  resolution-dependent shift: ``sigmas = linspace(1, 1/n, n)`` with ``mu = calculate_shift(tokens)``.
  True CFG as the pipeline's ``true_cfg_scale`` > 1 with a ``negative_prompt``: the pipeline calls the
  transformer twice (prompt, then negative prompt, the guidance embedding in both); here both halves run
  in one batch ``[negative; prompt]`` and combine as ``neg + s (pos - neg)``: the same outputs up to
  float32 rounding. Without it there is no CFG batch.
- **Wan** (2.1): UMT5 prompts, 3-D video latents ``(16, (F-1)/4+1, H/8, W/8)``, CFG (the pipeline calls
  the transformer once per half; here both halves run in one batch, which gives the same outputs),
  ``set_timesteps(n)`` with the scheduler's flow shift.

Every denoiser records the sampler it samples with (``info["sampler"]``, :func:`~l2c_kernels.schedule.sampler_info`
with ``mu``), so a learned schedule can say which timesteps it was made for; :func:`pipeline_timesteps`
gives the timesteps (and that record) a pipeline will use at a given size and step count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..schedule import sampler_info
from .conditioning import Request, pipeline_default, register_pipeline
from .denoiser import Denoiser
from .schedulers import resolve_scheduler


@dataclass
class PipelineDenoiser(Denoiser):
    """A :class:`Denoiser` whose latents are not ``(C, H, W)`` (packed Flux tokens, Wan video) and whose
    timesteps are set exactly as its pipeline sets them."""

    tokens: int = 0                              # image (video) tokens the transformer sees per sample
    timestep_rule: Callable | None = None        # (scheduler, steps, tokens) -> set_timesteps kwargs (mu, sigmas)

    @property
    def image_tokens(self) -> int:
        return self.tokens

    def scheduler(self, num_inference_steps: int):
        sched = self.make_scheduler()
        kw = self.timestep_rule(sched, num_inference_steps, self.tokens) if self.timestep_rule else {}
        sched.set_timesteps(num_inference_steps, **kw)
        # flow-matching schedulers have neither; these pipelines start from unit noise and feed latents as they are
        if not hasattr(sched, "init_noise_sigma"):
            sched.init_noise_sigma = 1.0
        if not hasattr(sched, "scale_model_input"):
            sched.scale_model_input = lambda sample, timestep=None: sample
        return sched

    def sampler(self, num_inference_steps: int) -> dict:
        """:func:`~l2c_kernels.schedule.sampler_info` of the sampler at ``num_inference_steps`` (with ``mu``)."""
        sched = self.make_scheduler()
        kw = self.timestep_rule(sched, num_inference_steps, self.tokens) if self.timestep_rule else {}
        return sampler_info(sched, mu=kw.get("mu"))


# -- the pipelines' timestep rules ---------------------------------------------------------------------
def _calculate_shift(config, image_seq_len: int) -> float:
    """diffusers' ``calculate_shift`` with the scheduler config's settings (the pipelines' defaults)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


def _sd3_rule(sched, steps: int, tokens: int) -> dict:
    if sched.config.get("use_dynamic_shifting", None):
        return dict(mu=_calculate_shift(sched.config, tokens))
    return {}


def _flux_rule(sched, steps: int, tokens: int) -> dict:
    import numpy as np

    kw = dict(mu=_calculate_shift(sched.config, tokens))
    if not getattr(sched.config, "use_flow_sigmas", False):
        kw["sigmas"] = np.linspace(1.0, 1 / steps, steps)
    return kw


def _plain_rule(sched, steps: int, tokens: int) -> dict:
    return {}


# -- shared checks ------------------------------------------------------------------------------------
def _unwrap(transformer):
    return getattr(transformer, "original_model", transformer)


def _prompts(req: Request, name: str) -> list[str]:
    if not req.prompts:
        raise ValueError(f"learning a schedule on {name} needs calibration prompts (prompts=[...])")
    return [str(p) for p in req.prompts]


def _size(req: Request, default: int, unit: int, name: str, why: str) -> tuple[int, int]:
    h, w = req.height or default, req.width or default
    for what, v in (("height", h), ("width", w)):
        if not isinstance(v, int) or v <= 0 or v % unit:
            raise ValueError(f"{what}={v} does not fit {name}: it must be a positive multiple of {unit} ({why})")
    return h, w


def _guidance(pipe, req: Request, fallback: float) -> float:
    return float(req.guidance_scale if req.guidance_scale is not None
                 else pipeline_default(pipe, "guidance_scale", fallback))


def _max_len(pipe, req: Request, fallback: int) -> int:
    return int(req.max_sequence_length or pipeline_default(pipe, "max_sequence_length", fallback))


def _scheduler(pipe, req: Request, name: str):
    return resolve_scheduler(pipe.scheduler, req.scheduler, name)


def _finish(den: PipelineDenoiser, pipe, req: Request) -> PipelineDenoiser:
    den.info.setdefault("pipeline", type(pipe).__name__)
    den.info["prompts"] = list(req.prompts)
    den.info["sampler"] = den.sampler(1)  # its class and config; mu depends on the size only, not on steps
    return den


# -- SD3 ----------------------------------------------------------------------------------------------
def sd3_pipeline_denoiser(pipe, req: Request) -> PipelineDenoiser:
    """``StableDiffusion3Pipeline`` (SD3, SD3.5)."""
    tr = _unwrap(pipe.transformer)
    name = type(pipe).__name__
    prompts = _prompts(req, name)
    vf, patch = int(pipe.vae_scale_factor), int(tr.config.patch_size)
    h, w = _size(req, int(pipe.default_sample_size) * vf, vf * patch, name, f"patch size {patch} x VAE factor {vf}")
    cfg = _guidance(pipe, req, 7.0)
    dev = tr.device
    with torch.no_grad():
        pe, ne, pp, npool = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=dev,
                                               do_classifier_free_guidance=cfg > 1, negative_prompt="",
                                               max_sequence_length=_max_len(pipe, req, 256))
    enc = torch.cat([ne, pe]) if cfg > 1 else pe
    pooled = torch.cat([npool, pp]) if cfg > 1 else pp
    shape = (int(tr.config.in_channels), h // vf, w // vf)
    tokens = (shape[1] // patch) * (shape[2] // patch)
    den = PipelineDenoiser(tr, dict(encoder_hidden_states=enc.to(tr.dtype), pooled_projections=pooled.to(tr.dtype)),
                           shape, _scheduler(pipe, req, name), cfg, len(prompts), text_tokens=int(enc.shape[1]),
                           patch_size=patch, tokens=tokens, timestep_rule=_sd3_rule,
                           info=dict(height=h, width=w, guidance_scale=cfg))
    return _finish(den, pipe, req)


# -- Flux ---------------------------------------------------------------------------------------------
def flux_pipeline_denoiser(pipe, req: Request) -> PipelineDenoiser:
    """``FluxPipeline`` (Flux.1-dev with its guidance embedding, or schnell without)."""
    tr = _unwrap(pipe.transformer)
    name = type(pipe).__name__
    prompts = _prompts(req, name)
    vf = int(pipe.vae_scale_factor)
    h, w = _size(req, int(pipe.default_sample_size) * vf, 2 * vf, name, f"VAE factor {vf} x 2 for the 2x2 packing")
    g = _guidance(pipe, req, 3.5)
    true_cfg, negative = _true_cfg(pipe, req, len(prompts), name)
    dev, dtype = tr.device, tr.dtype
    max_len = _max_len(pipe, req, 512)
    with torch.no_grad():
        pe, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=dev, max_sequence_length=max_len)
        if true_cfg > 1:
            ne, npool, neg_ids = pipe.encode_prompt(prompt=negative, prompt_2=None, device=dev,
                                                    max_sequence_length=max_len)
            if ne.shape != pe.shape or not torch.equal(neg_ids, text_ids):
                raise ValueError(f"{name}: the negative prompts encode to {tuple(ne.shape)} text states, the prompts to "
                                 f"{tuple(pe.shape)}; true CFG in one batch needs the same shape")
            pe, pooled = torch.cat([ne, pe]), torch.cat([npool, pooled])
    lh, lw = 2 * (h // (vf * 2)), 2 * (w // (vf * 2))
    img_ids = pipe._prepare_latent_image_ids(len(prompts), lh // 2, lw // 2, dev, pe.dtype)
    tokens = (lh // 2) * (lw // 2)
    shape = (tokens, int(tr.config.in_channels))
    args = dict(encoder_hidden_states=pe.to(dtype), pooled_projections=pooled.to(dtype), txt_ids=text_ids,
                img_ids=img_ids, joint_attention_kwargs={})
    if tr.config.guidance_embeds:
        args["guidance"] = torch.full([pe.shape[0]], g, device=dev, dtype=torch.float32)
    info = dict(height=h, width=w, guidance_scale=g if tr.config.guidance_embeds else None)
    if true_cfg > 1:
        info.update(true_cfg_scale=true_cfg, negative_prompt=negative)
    den = PipelineDenoiser(tr, args, shape, _scheduler(pipe, req, name), true_cfg if true_cfg > 1 else 1.0,
                           len(prompts), text_tokens=int(pe.shape[1]), patch_size=1, tokens=tokens,
                           timestep_rule=_flux_rule,
                           model_timestep=lambda t: t.to(tr.dtype) / 1000,   # as the pipeline: t in the latents' dtype
                           info=info)
    return _finish(den, pipe, req)


def _true_cfg(pipe, req: Request, n: int, name: str) -> tuple[float, list | None]:
    """``(true_cfg_scale, negative prompts)`` as FluxPipeline decides them: true CFG runs when the scale is
    above 1 and there is a negative prompt. A scale above 1 without one is refused here (the pipeline would
    silently sample without guidance)."""
    scale = float(req.true_cfg_scale if req.true_cfg_scale is not None else pipeline_default(pipe, "true_cfg_scale", 1.0))
    neg = req.negative_prompt
    if scale <= 1:
        return scale, None
    if neg is None:
        raise ValueError(f"true_cfg_scale={scale} needs a negative_prompt ({name} applies true CFG only with one; "
                         "negative_prompt=\"\" is the empty prompt)")
    negs = [neg] * n if isinstance(neg, str) else [str(v) for v in neg]
    if len(negs) != n:
        raise ValueError(f"negative_prompt has {len(negs)} entries for {n} prompts; give one string or one per prompt")
    return scale, negs


# -- Wan ----------------------------------------------------------------------------------------------
def wan_pipeline_denoiser(pipe, req: Request) -> PipelineDenoiser:
    """``WanPipeline`` (Wan 2.1 text-to-video; one transformer); ``num_frames`` from the request if it has
    one, else the pipeline's default (81)."""
    tr = _unwrap(pipe.transformer)
    name = type(pipe).__name__
    if getattr(pipe, "transformer_2", None) is not None or pipe.config.get("expand_timesteps", False):
        raise ValueError(f"{name} with two experts (transformer_2, Wan 2.2) or per-token timesteps "
                         "(expand_timesteps) is not supported by the learner; use a Wan 2.1 pipeline")
    prompts = _prompts(req, name)
    vs, vt = int(pipe.vae_scale_factor_spatial), int(pipe.vae_scale_factor_temporal)
    pt, ph, pw = (int(p) for p in tr.config.patch_size)
    h, w = _size(req, 480, 16, name, "the pipeline's multiple of 16")
    frames = int(getattr(req, "num_frames", None) or pipeline_default(pipe, "num_frames", 81))
    if frames < 1 or (frames - 1) % vt:
        raise ValueError(f"num_frames={frames} does not fit {name}: it must be 1 + a multiple of {vt}")
    cfg = _guidance(pipe, req, 5.0)
    dev = tr.device
    with torch.no_grad():
        pe, ne = pipe.encode_prompt(prompt=prompts, negative_prompt="", do_classifier_free_guidance=cfg > 1,
                                    max_sequence_length=_max_len(pipe, req, 512), device=dev)
    enc = torch.cat([ne, pe]) if cfg > 1 else pe
    shape = (int(tr.config.in_channels), (frames - 1) // vt + 1, h // vs, w // vs)
    tokens = (shape[1] // pt) * (shape[2] // ph) * (shape[3] // pw)
    den = PipelineDenoiser(tr, dict(encoder_hidden_states=enc.to(tr.dtype)), shape, _scheduler(pipe, req, name),
                           cfg, len(prompts), text_tokens=int(enc.shape[1]), patch_size=ph, tokens=tokens,
                           timestep_rule=_plain_rule, info=dict(height=h, width=w, num_frames=frames,
                                                                guidance_scale=cfg))
    return _finish(den, pipe, req)


BUILDERS = {"StableDiffusion3Pipeline": sd3_pipeline_denoiser, "FluxPipeline": flux_pipeline_denoiser,
            "WanPipeline": wan_pipeline_denoiser}
for _name, _builder in BUILDERS.items():
    register_pipeline(_name, _builder)


def pipeline_timesteps(pipe, num_inference_steps: int, **request) -> tuple[list[float], dict]:
    """``(timesteps, sampler record)`` that ``pipe`` samples with at ``num_inference_steps`` for the size in
    ``request`` (``height=``, ``width=``; prompts are not needed): what ``Schedule.full`` / ``retimed`` take."""
    req = Request(prompts=["timesteps"], **request)
    den = BUILDERS[type(pipe).__name__](pipe, req) if type(pipe).__name__ in BUILDERS else None
    if den is None:
        raise TypeError(f"pipeline_timesteps supports {', '.join(BUILDERS)}; got {type(pipe).__name__}")
    return den.timesteps(num_inference_steps), den.sampler(num_inference_steps)
