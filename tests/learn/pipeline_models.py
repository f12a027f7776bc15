"""Tiny DiT-XL/2-shaped and PixArt-Sigma-shaped diffusers pipelines built from configs (nothing downloaded).

DiT: learned sigma (``out_channels = 2 * in_channels``), ImageNet-sized class table
(``num_embeds_ada_norm=1000``, null class 1000 as ``DiTPipeline`` hard-codes), a 4-channel
``AutoencoderKL`` with spatial factor 2. PixArt-Sigma: the same VAE, a tiny T5 encoder and tokenizer
(``tests.tiny_pipelines``), learned sigma, DPM-Solver++ as the published pipeline uses.
"""
from __future__ import annotations

import torch

from tests.tiny_pipelines import scale_weights, t5_encoder, t5_tokenizer, T5_DIM

VAE_FACTOR = 2
LATENT = 8          # DiT / PixArt sample_size (latent pixels)
PATCH = 2


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[4, 4], layers_per_block=1,
                        latent_channels=4, norm_num_groups=2, sample_size=LATENT * VAE_FACTOR)
    return vae.eval().requires_grad_(False)


def dit_xl_shaped_pipeline(seed: int = 0, layers: int = 2):
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    tr = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                               num_layers=layers, sample_size=LATENT, patch_size=PATCH, num_embeds_ada_norm=1000)
    scale_weights(tr, seed)
    return DiTPipeline(transformer=tr, vae=tiny_vae(seed), scheduler=DDIMScheduler())


def pixart_sigma_shaped_pipeline(seed: int = 0, layers: int = 2):
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    tr = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=layers, sample_size=LATENT, patch_size=PATCH, cross_attention_dim=16,
                                  caption_channels=T5_DIM, use_additional_conditions=False,
                                  norm_type="ada_norm_single")
    scale_weights(tr, seed)
    return PixArtSigmaPipeline(tokenizer=t5_tokenizer(), text_encoder=t5_encoder(seed), vae=tiny_vae(seed),
                               transformer=tr, scheduler=DPMSolverMultistepScheduler())


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents to images in [0, 1] the way both pipelines decode them."""
    with torch.no_grad():
        img = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (img / 2 + 0.5).clamp(0, 1)
