"""Unmodified diffusers pipelines around the bundled pixel-space models.

``DiTPipeline`` and ``PixArtAlphaPipeline`` expect a VAE, and PixArt a Hugging Face
tokenizer and text encoder. The bundled models work in pixel space and carry their own
caption encoder, so this module provides drop-in stand-ins: an identity "VAE" (scale
factor 1) and thin wrappers giving the caption tokenizer/encoder the call conventions the
pipeline uses. Nothing is downloaded.

    pipe = pixart_pipeline(models.load("pixart-digits"))
    img = pipe("the digit seven", num_inference_steps=25, use_resolution_binning=False,
               max_sequence_length=8, output_type="pt").images
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput

from .text_encoder import VOCAB, DigitTextEncoder, DigitTokenizer


class IdentityVAE(ModelMixin, ConfigMixin):
    """A VAE whose latent space is pixel space: ``decode(z) = z``."""

    @register_to_config
    def __init__(self, channels: int = 1, scaling_factor: float = 1.0):
        super().__init__()
        self.register_buffer("_anchor", torch.zeros(1), persistent=False)  # gives the module a device/dtype
        self.config.block_out_channels = [channels]  # vae_scale_factor = 2 ** (len - 1) = 1
        self.config.latent_channels = channels

    def decode(self, z: torch.Tensor, return_dict: bool = True, **_):
        return DecoderOutput(sample=z) if return_dict else (z,)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        dist = SimpleNamespace(sample=lambda generator=None: x, mode=lambda: x, mean=x)
        return SimpleNamespace(latent_dist=dist) if return_dict else (dist,)


class PipelineTokenizer:
    """The caption tokenizer with the Hugging Face call convention pipelines use."""

    def __init__(self, tokenizer: DigitTokenizer):
        self.tok = tokenizer
        self.model_max_length = tokenizer.max_length

    def __call__(self, text, padding=None, max_length=None, truncation=True, add_special_tokens=True,
                 return_tensors="pt", **_):
        ids, mask = self.tok(list(text) if isinstance(text, (list, tuple)) else [text])
        return SimpleNamespace(input_ids=ids, attention_mask=mask)

    def batch_decode(self, ids, **_):
        return [" ".join(VOCAB[int(i)] for i in row if int(i) > 2) for row in ids]


class PipelineTextEncoder(torch.nn.Module):
    """The caption encoder returning ``(hidden_states,)`` like a transformers encoder."""

    def __init__(self, encoder: DigitTextEncoder):
        super().__init__()
        self.encoder = encoder

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, input_ids, attention_mask=None, **_):
        if attention_mask is None:
            attention_mask = (input_ids != 0).long()
        return (self.encoder(input_ids, attention_mask),)


def _scheduler(bundle, name: str):
    from ..sampling import make_scheduler

    return make_scheduler(bundle.scheduler_config, name)


def dit_pipeline(bundle, scheduler: str = "ddim"):
    """A ``DiTPipeline`` around a bundled class-conditional model (labels 0..9; null class 1000)."""
    from diffusers import DiTPipeline

    vae = IdentityVAE(bundle.transformer.config.in_channels).to(bundle.transformer.device)
    return DiTPipeline(transformer=bundle.transformer, vae=vae, scheduler=_scheduler(bundle, scheduler))


def pixart_pipeline(bundle, scheduler: str = "ddim"):
    """A ``PixArtAlphaPipeline`` around a bundled text-conditional model and its caption encoder.

    Call it with ``use_resolution_binning=False`` (the binning tables are for 256px and up) and
    ``max_sequence_length`` equal to the caption encoder's length (8).
    """
    from diffusers import PixArtAlphaPipeline

    vae = IdentityVAE(bundle.transformer.config.in_channels).to(bundle.transformer.device)
    return PixArtAlphaPipeline(tokenizer=PipelineTokenizer(bundle.text_encoder.tokenizer),
                               text_encoder=PipelineTextEncoder(bundle.text_encoder), vae=vae,
                               transformer=bundle.transformer, scheduler=_scheduler(bundle, scheduler))
