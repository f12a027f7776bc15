"""From what the user has to a :class:`~l2c_kernels.sampling.denoiser.Denoiser`: a registry keyed by
pipeline class name.

    den = denoiser_for(pipe, labels=[207, 360], guidance_scale=4.0)            # DiTPipeline
    den = denoiser_for(pipe, prompts=["a cat"], height=512, width=1024)       # PixArt-Alpha / -Sigma
    den = denoiser_for(transformer, scheduler=sched, conditions={...},        # your own loop
                       latent_shape=(4, 32, 32), guidance_scale=4.5)

Supporting another pipeline is one builder, ``builder(pipe, request) -> Denoiser`` registered with
:func:`register_pipeline` under the pipeline's class name (``request`` is a :class:`Request`: labels
or prompts, height/width, guidance scale, scheduler, seed). Builders live next to the conditioning
they know: DiT and PixArt here, the MMDiT pipelines (SD3, Flux, Wan) in ``mmdit_conditions.py`` (imported,
and registering itself, the first time a class name is not found: :data:`PLUGIN_MODULES`), the bundled digits
models in their own package (``l2c_kernels.models.denoisers``, a plug-in on top of the library). Models can be
given by name where a plug-in registered the name (:func:`register_model_names`).

Every builder reads the facts from the model instead of assuming them: the null class and label
range from ``num_embeds_ada_norm``, the latent shape from height/width and the VAE scale factor
(non-square works; both must be multiples of patch size x VAE factor), the number of text tokens
from the encoded prompts, and the sampler from the pipeline (``scheduler=None``) or as asked, refused
when it does not fit (:func:`~l2c_kernels.sampling.schedulers.resolve_scheduler`).
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, replace
from typing import Callable

import torch

from .denoiser import Denoiser
from .schedulers import resolve_scheduler


@dataclass
class Request:
    """What the user asked for; a builder fills in the rest from the model."""

    num_samples: int = 4                 # samples when neither labels nor prompts are given
    guidance_scale: float | None = None  # None: the pipeline's default
    labels: list | None = None
    prompts: list | None = None
    height: int | None = None            # image pixels; None: the model's default
    width: int | None = None
    seed: int = 0
    scheduler: object = None             # None (the pipeline's own), a name, or a diffusers scheduler
    max_sequence_length: int | None = None   # text tokens (PixArt: the pipeline's default, 120 / 300)
    true_cfg_scale: float | None = None  # FluxPipeline's true CFG (with negative_prompt); None: the pipeline's (off)
    negative_prompt: object = None       # str (every prompt) or one per prompt; FluxPipeline's true CFG


_BUILDERS: dict[str, Callable] = {}
#: Modules (in this package) imported on a miss; each calls :func:`register_pipeline` for what it supports.
PLUGIN_MODULES = ["mmdit_conditions"]
_NAMED: dict[str, Callable] = {}


def register_pipeline(name: str, builder: Callable) -> None:
    """Support objects whose class is called ``name``: ``builder(obj, request: Request) -> Denoiser``."""
    _BUILDERS[name] = builder


def register_model_names(names, loader: Callable) -> None:
    """Let the library take these model names where it takes a model: ``loader(name) -> model``."""
    for n in names:
        _NAMED[str(n)] = loader


def load_named(name: str):
    """The model a plug-in registered under ``name`` (:func:`register_model_names`)."""
    if name not in _NAMED:
        known = ", ".join(sorted(_NAMED)) or "none"
        raise ValueError(f"unknown model name {name!r}; models known by name: {known}")
    return _NAMED[name](name)


def _builder(obj) -> Callable:
    name = type(obj).__name__
    if name not in _BUILDERS:
        for mod in PLUGIN_MODULES:
            try:
                importlib.import_module(f"{__package__}.{mod}")
            except ModuleNotFoundError as e:
                if e.name != f"{__package__}.{mod}":
                    raise
    if name not in _BUILDERS:
        raise TypeError(f"learning a schedule is supported for {', '.join(sorted(_BUILDERS))}, a bundled model "
                        f"name, or a transformer with scheduler=, conditions= and latent_shape=; got {name}")
    return _BUILDERS[name]


def denoiser_for(obj, num_samples: int = 4, cfg: float | None = None, scheduler=None, seed: int = 0,
                 labels=None, prompts=None, *, height: int | None = None, width: int | None = None,
                 conditions: dict | None = None, latent_shape=None, max_sequence_length: int | None = None,
                 cond_first: bool = False, true_cfg_scale: float | None = None,
                 negative_prompt=None, model_timestep=None) -> Denoiser:
    """A :class:`Denoiser` for a pipeline, a bundled model (or its name), or a transformer.

    ``true_cfg_scale`` / ``negative_prompt``: FluxPipeline's true classifier-free guidance (both halves in
    one batch, ``[negative; prompt]``), as the pipeline's arguments of the same names.

    For a transformer give ``scheduler`` (a diffusers scheduler), ``conditions`` (its keyword arguments
    for the whole model batch: with ``cfg > 1`` the unconditional half first unless ``cond_first``) and
    ``latent_shape``, one sample's latents as the transformer takes them: ``(C, H, W)``, packed ``(tokens, C)``
    (Flux), ``(C, F, H, W)`` (video). ``model_timestep``: what the loop passes the transformer for a scheduler
    timestep ``t`` (a tensor), e.g. ``lambda t: t / 1000`` for Flux; None: ``t`` as it is."""
    if isinstance(obj, str):
        obj = load_named(obj)
    if isinstance(obj, torch.nn.Module) and conditions is not None:
        return _from_transformer(obj, scheduler, conditions, latent_shape, cfg, cond_first, model_timestep)
    if isinstance(obj, torch.nn.Module):
        raise TypeError(f"a bare {type(obj).__name__} needs scheduler=, conditions= (its keyword arguments for "
                        "one model call) and latent_shape=; or pass the pipeline")
    req = Request(num_samples=num_samples, guidance_scale=cfg, labels=None if labels is None else list(labels),
                  prompts=None if prompts is None else list(prompts), height=height, width=width, seed=seed,
                  scheduler=scheduler, max_sequence_length=max_sequence_length, true_cfg_scale=true_cfg_scale,
                  negative_prompt=negative_prompt)
    if (true_cfg_scale is not None or negative_prompt is not None) and type(obj).__name__ != "FluxPipeline":
        raise ValueError(f"true_cfg_scale / negative_prompt are FluxPipeline's true CFG; {type(obj).__name__} "
                         "takes guidance_scale")
    return _builder(obj)(obj, req)


# -- helpers builders share -------------------------------------------------------------------------
def pipeline_default(pipe, arg: str, fallback=None):
    """The default of ``pipe.__call__``'s argument ``arg`` (guidance scale, max_sequence_length)."""
    p = inspect.signature(type(pipe).__call__).parameters.get(arg)
    return fallback if p is None or p.default is inspect.Parameter.empty else p.default


def vae_scale_factor(pipe) -> int:
    f = getattr(pipe, "vae_scale_factor", None)
    if f:
        return int(f)
    vae = getattr(pipe, "vae", None)
    return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1


def latent_shape_for(transformer, pipe_name: str, height, width, vae_factor: int) -> tuple:
    """``(C, H, W)`` latents for an image of ``height`` x ``width`` pixels (default: the model's size)."""
    cfg = transformer.config
    patch = int(cfg.patch_size)
    size = int(cfg.sample_size) * vae_factor
    height, width = height or size, width or size
    unit = patch * vae_factor
    for what, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v <= 0 or v % unit:
            raise ValueError(f"{what}={v} does not fit {pipe_name}: it must be a positive multiple of {unit} "
                             f"(patch size {patch} x VAE scale factor {vae_factor})")
    return (int(cfg.in_channels), height // vae_factor, width // vae_factor)


def _unwrap(transformer):
    return getattr(transformer, "original_model", transformer)


def _draw(n: int, low: int, high: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(low, high, (n,), generator=g).tolist()


# -- DiT ----------------------------------------------------------------------------------------
def class_labels_for(transformer, labels, num_samples: int, seed: int, what: str) -> tuple[list[int], int]:
    """``(labels, null class)`` checked against ``num_embeds_ada_norm`` (labels 0..n-1, null n)."""
    n = getattr(transformer.config, "num_embeds_ada_norm", None)
    if not n:
        raise ValueError(f"{what} has no class embedding (num_embeds_ada_norm is {n})")
    if labels is None:
        return _draw(num_samples, 0, n, seed), n
    labels = [int(v) for v in (labels.tolist() if isinstance(labels, torch.Tensor) else labels)]
    bad = [v for v in labels if not 0 <= v < n]
    if bad:
        raise ValueError(f"labels {bad[:5]} are out of range for {what}: its classes are 0..{n - 1} "
                         f"(num_embeds_ada_norm={n}; {n} is the null class)")
    if not labels:
        raise ValueError("labels is empty")
    return labels, n


def dit_pipeline_denoiser(pipe, req: Request) -> Denoiser:
    """``DiTPipeline``: class labels, null class from the config, conditional half first, learned sigma."""
    tr = _unwrap(pipe.transformer)
    name = type(pipe).__name__
    labels, null = class_labels_for(tr, req.labels, req.num_samples, req.seed, name)
    cfg = float(req.guidance_scale if req.guidance_scale is not None else pipeline_default(pipe, "guidance_scale", 4.0))
    shape = latent_shape_for(tr, name, req.height, req.width, vae_scale_factor(pipe))
    cond = torch.tensor(labels, device=tr.device)
    args = dict(class_labels=torch.cat([cond, torch.full_like(cond, null)]) if cfg > 1 else cond)
    redraw = None if req.labels is not None else (lambda seed: dit_pipeline_denoiser(pipe, replace(req, seed=seed)))
    return Denoiser(tr, args, shape, resolve_scheduler(pipe.scheduler, req.scheduler, name), cfg, len(labels),
                    cond_first=True, patch_size=int(tr.config.patch_size), redraw=redraw,
                    info=dict(pipeline=name, labels=labels))


# -- PixArt -------------------------------------------------------------------------------------
def pixart_pipeline_denoiser(pipe, req: Request) -> Denoiser:
    """``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline``: T5 prompts (negative prompt ""), micro-conditions
    as the pipeline sets them, learned sigma."""
    tr = _unwrap(pipe.transformer)
    name = type(pipe).__name__
    if not req.prompts:
        raise ValueError(f"learning a schedule on {name} needs calibration prompts (prompts=[...])")
    prompts = [str(p) for p in req.prompts]
    cfg = float(req.guidance_scale if req.guidance_scale is not None else pipeline_default(pipe, "guidance_scale", 4.5))
    vf = vae_scale_factor(pipe)
    shape = latent_shape_for(tr, name, req.height, req.width, vf)
    dev = tr.device
    max_len = req.max_sequence_length or pipeline_default(pipe, "max_sequence_length", 120)
    with torch.no_grad():
        pe, pm, ne, nm = pipe.encode_prompt(prompts, do_classifier_free_guidance=cfg > 1, negative_prompt="",
                                            device=dev, clean_caption=False, max_sequence_length=max_len)[:4]
    enc = (torch.cat([ne, pe]) if cfg > 1 else pe).to(tr.dtype)
    mask = torch.cat([nm, pm]) if cfg > 1 else pm
    added = {"resolution": None, "aspect_ratio": None}
    if name == "PixArtAlphaPipeline" and tr.config.sample_size == 128:
        h, w = shape[1] * vf, shape[2] * vf
        rows = enc.shape[0]
        added = {"resolution": torch.tensor([h, w]).repeat(rows, 1).to(dev, enc.dtype),
                 "aspect_ratio": torch.tensor([float(h / w)]).repeat(rows, 1).to(dev, enc.dtype)}
    args = dict(encoder_hidden_states=enc, encoder_attention_mask=mask, added_cond_kwargs=added)
    return Denoiser(tr, args, shape, resolve_scheduler(pipe.scheduler, req.scheduler, name), cfg, len(prompts),
                    text_tokens=int(enc.shape[1]), patch_size=int(tr.config.patch_size),
                    info=dict(pipeline=name, prompts=prompts))


register_pipeline("DiTPipeline", dit_pipeline_denoiser)
register_pipeline("PixArtAlphaPipeline", pixart_pipeline_denoiser)
register_pipeline("PixArtSigmaPipeline", pixart_pipeline_denoiser)


# -- a transformer and the user's own conditioning -------------------------------------------------
#: keyword arguments of diffusers transformers that hold one row per model-batch sample (position ids and the like
#: do not); where none of them is given, every tensor is taken as batched
BATCHED_CONDITIONS = ("encoder_hidden_states", "pooled_projections", "class_labels", "encoder_attention_mask",
                      "guidance", "added_cond_kwargs")


def _from_transformer(transformer, scheduler, conditions: dict, latent_shape, cfg, cond_first: bool,
                      model_timestep=None) -> Denoiser:
    tr = _unwrap(transformer)
    what = type(tr).__name__
    if scheduler is None or isinstance(scheduler, str):
        raise ValueError(f"learning on a bare {what} needs scheduler= (the diffusers scheduler your loop uses)")
    if latent_shape is None or len(tuple(latent_shape)) < 2:
        raise ValueError(f"latent_shape must be one sample's latents as the transformer takes them ((C, H, W), packed "
                         f"(tokens, C), video (C, F, H, W)), got {latent_shape!r}")
    if model_timestep is not None and not callable(model_timestep):
        raise TypeError(f"model_timestep must map a scheduler timestep tensor to the model's (e.g. lambda t: t / 1000), "
                        f"got {model_timestep!r}")
    latent_shape = tuple(int(v) for v in latent_shape)
    cfg = 1.0 if cfg is None else float(cfg)
    named = any(k in conditions for k in BATCHED_CONDITIONS)
    batched = {k: v for k, v in conditions.items() if isinstance(v, torch.Tensor) and v.ndim > 0
               and (k in BATCHED_CONDITIONS or not named)}
    rows = {int(v.shape[0]) for v in batched.values()}
    if len(rows) != 1:
        sizes = ", ".join(f"{k} {int(v.shape[0])}" for k, v in batched.items()) or "none"
        raise ValueError(f"conditions must hold the model batch in one size (the rows of {', '.join(BATCHED_CONDITIONS)}"
                         f"; Flux's img_ids / txt_ids have none); got {sizes}")
    rows = rows.pop()
    per = 2 if cfg > 1 else 1
    if rows % per:
        raise ValueError(f"with guidance_scale {cfg} the conditions hold both CFG halves: their batch ({rows}) "
                         "must be even")
    enc = conditions.get("encoder_hidden_states")
    patch = int(getattr(tr.config, "patch_size", 1) or 1)
    return Denoiser(tr, dict(conditions), latent_shape, resolve_scheduler(scheduler, None, what), cfg, rows // per,
                    cond_first=cond_first, text_tokens=0 if enc is None else int(enc.shape[1]), patch_size=patch,
                    model_timestep=model_timestep, info=dict(transformer=what))
