"""``flux-digits``: a diffusers ``FluxTransformer2DModel`` on the 16x16 digits, trained with rectified flow.

Pixel space, one channel; pixels are packed 2x2 into 4-channel tokens (64 image tokens) and the RoPE
ids are made exactly as ``FluxPipeline`` packs latents and makes ``img_ids`` / ``txt_ids`` (its own static
methods are used). Captions go through the bundled caption encoder (8 tokens of 64 dims); its masked mean
is the pooled projection. Guidance is classifier-free (captions were dropped 10% of the time in training);
there is no distilled guidance embedding.

    from l2c_kernels.models import load, flux_digits
    bundle = load("flux-digits")
    images = flux_digits.sample(bundle, labels=range(10), steps=28, cfg=None, seed=0)   # [10, 1, 16, 16]

Learning a schedule: ``learn_schedule("flux-digits", 28, 0.5, **LEARN_DEFAULTS)`` (CFG 7 in one batch, Euler
flow matching, one unit per block; ``l2c learn --model flux-digits``).

Sampling is Euler flow matching (``FlowMatchEulerDiscreteScheduler``) over FluxPipeline's sigmas
``linspace(1, 1/steps, steps)``; the transformer gets ``timestep = t / 1000`` as in FluxPipeline.
``sample(transformer=...)`` takes any module with the transformer's call signature (e.g. a compiled schedule).
"""
from __future__ import annotations

import numpy as np
import torch

from . import configs

CHANNELS = 1  # pixel channels before packing

#: ``learn_schedule`` settings for flux-digits on CPU (``l2c learn --model flux-digits`` uses them):
#: its transformer call costs several DiT-digits calls, so router batches of 2 images; candidates chosen on 16.
#: ``l2c_kernels.learn_schedule("flux-digits", 28, 0.5, **flux_digits.LEARN_DEFAULTS)``
LEARN_DEFAULTS = dict(iterations=12, batch_size=2, calibration_samples=16)


def _flux():
    from diffusers import FluxPipeline

    return FluxPipeline


def pack(images: torch.Tensor) -> torch.Tensor:
    """``[B, 1, H, W]`` pixels -> ``[B, H/2 * W/2, 4]`` tokens (``FluxPipeline._pack_latents``)."""
    if images.dim() != 4 or images.shape[1] != CHANNELS or images.shape[2] % 2 or images.shape[3] % 2:
        raise ValueError(f"flux-digits packs [B, {CHANNELS}, H, W] images with even H and W, got {tuple(images.shape)}")
    b, c, h, w = images.shape
    return _flux()._pack_latents(images, b, c, h, w)


def unpack(tokens: torch.Tensor, size: int = configs.IMAGE_SIZE) -> torch.Tensor:
    """``[B, 64, 4]`` tokens -> ``[B, 1, 16, 16]`` pixels (``FluxPipeline._unpack_latents``, VAE factor 1 x 2)."""
    return _flux()._unpack_latents(tokens, size, size, 1)  # the identity "VAE": scale factor 1


def image_ids(size: int = configs.IMAGE_SIZE, device=None, dtype=torch.float32) -> torch.Tensor:
    """``[64, 3]`` RoPE ids (0, row, col) of the packed tokens, as ``FluxPipeline._prepare_latent_image_ids``."""
    return _flux()._prepare_latent_image_ids(1, size // 2, size // 2, device, dtype)


def text_ids(length: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``[L, 3]`` zeros: FluxPipeline's ``txt_ids``."""
    return torch.zeros(length, 3, device=device, dtype=dtype)


def caption_embeddings(text_encoder, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids -> (``encoder_hidden_states [B, L, 64]`` with padding zeroed, ``pooled_projections [B, 64]``,
    the mean over the caption's tokens). Differentiable (training uses it)."""
    h = text_encoder(ids, mask)
    m = mask.to(h.dtype).unsqueeze(-1)
    h = h * m
    pooled = h.sum(1) / m.sum(1).clamp_min(1.0)
    return h, pooled


def conditions(bundle, prompts: list[str], cfg: float) -> dict:
    """Transformer kwargs (besides ``hidden_states`` and ``timestep``) for ``prompts``; with ``cfg > 1`` the
    batch is [empty captions; prompts] (unconditional half first)."""
    tr, te = bundle.transformer, bundle.text_encoder
    p = next(tr.parameters())
    caps = ([""] * len(prompts) + list(prompts)) if cfg > 1 else list(prompts)
    with torch.no_grad():
        ids, mask = te.tokenizer(caps)
        dev = next(te.parameters()).device
        enc, pooled = caption_embeddings(te, ids.to(dev), mask.to(dev))
    return dict(encoder_hidden_states=enc.to(p.device, p.dtype), pooled_projections=pooled.to(p.device, p.dtype),
                txt_ids=text_ids(enc.shape[1], p.device, p.dtype), img_ids=image_ids(device=p.device, dtype=p.dtype))


def make_scheduler(bundle_or_config):
    """A fresh ``FlowMatchEulerDiscreteScheduler`` for the model's flow-matching config."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = bundle_or_config if isinstance(bundle_or_config, dict) else bundle_or_config.scheduler_config
    return FlowMatchEulerDiscreteScheduler.from_config(dict(cfg))


def set_timesteps(scheduler, steps: int, device=None) -> None:
    """FluxPipeline's sigmas: ``linspace(1, 1/steps, steps)`` (then shifted by the scheduler's config)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps).tolist(), device=device)


def timesteps_for(bundle_or_config, steps: int) -> list[float]:
    """The timesteps (0..1000 scale, call order) a ``steps``-step sampling run visits; the transformer
    itself is called with these divided by 1000."""
    sc = make_scheduler(bundle_or_config)
    set_timesteps(sc, steps)
    return [float(t) for t in sc.timesteps]


class _PooledCaptionEncoder(torch.nn.Module):
    """The caption encoder in the place of FluxPipeline's CLIP text model: ``.pooler_output`` is the masked mean."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, **_):
        from types import SimpleNamespace

        mask = (input_ids != 0).long() if attention_mask is None else attention_mask
        hidden, pooled = caption_embeddings(self.encoder, input_ids, mask)
        return SimpleNamespace(pooler_output=pooled, last_hidden_state=hidden)


class _TokenCaptionEncoder(_PooledCaptionEncoder):
    """The caption encoder in the place of FluxPipeline's T5: ``[0]`` is the token states (padding zeroed)."""

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, **_):
        return (super().forward(input_ids, attention_mask).last_hidden_state,)


def _pipeline_tokenizer(tokenizer):
    from .pipelines import PipelineTokenizer

    class FluxPipelineTokenizer(PipelineTokenizer):
        """The caption tokenizer with what FluxPipeline's textual-inversion check reads as well."""

        added_tokens_encoder: dict = {}

        def tokenize(self, text: str) -> list[str]:
            return str(text).lower().split()

    return FluxPipelineTokenizer(tokenizer)


def flux_pipeline(bundle):
    """An unmodified diffusers ``FluxPipeline`` around flux-digits: the caption encoder stands in for CLIP
    (pooled) and T5 (tokens), an identity "VAE" for the autoencoder (pixel space).

    Call it with ``height=16, width=16, max_sequence_length=8``; classifier-free guidance is FluxPipeline's
    "true CFG": ``negative_prompt="", true_cfg_scale=cfg`` (there is no guidance embedding, so
    ``guidance_scale`` does nothing). ``latents=flux_digits.pack(noise)`` reproduces :func:`sample`."""
    from diffusers import FluxPipeline

    from .pipelines import IdentityVAE

    if not getattr(bundle, "is_flow_matching", False):
        raise ValueError(f"flux_pipeline wraps flux-digits, got {getattr(bundle, 'name', bundle)!r}")
    vae = IdentityVAE(CHANNELS).to(bundle.transformer.device)
    vae.register_to_config(shift_factor=0.0, block_out_channels=[CHANNELS], latent_channels=CHANNELS)  # factor 1
    tok = _pipeline_tokenizer(bundle.text_encoder.tokenizer)
    return FluxPipeline(scheduler=make_scheduler(bundle), vae=vae, tokenizer=tok, tokenizer_2=tok,
                        text_encoder=_PooledCaptionEncoder(bundle.text_encoder),
                        text_encoder_2=_TokenCaptionEncoder(bundle.text_encoder), transformer=bundle.transformer)
