"""Tiny, offline diffusers pipelines of the flow-matching MMDiT families: SD3, Flux and Wan.

Every component is built from a config object (nothing is downloaded): CLIP / T5 / UMT5 text
encoders and their tokenizers (a small byte-free BPE vocabulary for CLIP, a unigram one for T5),
VAEs with each family's latent layout (16 channels, spatial factor 8; Wan's causal 3-D VAE with
temporal factor 4), the published ``FlowMatchEulerDiscreteScheduler`` settings (SD3: shift 3.0;
Flux: resolution-dependent dynamic shift; Wan 2.1 480p: flow shift 3.0) and transformers with the
published block structure, 1-2 blocks of each kind and narrow heads.

Weights are seeded: the same call gives the same pipeline. Transformer weights are drawn with a
``1/sqrt(fan_in)`` scale (diffusers zero-initialises the adaLN and output projections, which would
make every output zero), so outputs depend on latents, timestep and prompt. Each pipeline samples
a few steps in well under a few seconds on one CPU core with ``output_type="latent"``.
"""
from __future__ import annotations

import string

import torch

T5_DIM = 32           # d_model of the tiny T5 / UMT5 (the MMDiT's joint_attention_dim / text_dim)
CLIP_DIM = 16         # hidden size of each tiny CLIP text model
CLIP_PROJ = 16        # projection_dim of CLIPTextModelWithProjection (SD3's pooled input is two of them)
CLIP_MAX_LEN = 77     # CLIP's position embeddings; the pipelines pad CLIP prompts to the tokenizer's length


# ------------------------------------------------------------------ weights
def scale_weights(module: torch.nn.Module, seed: int, gain: float = 1.0) -> torch.nn.Module:
    """Redraw every parameter, seeded: matrices ``N(0, gain^2 / fan_in)``, norm scales ``1 + N(0, 0.1^2)``,
    other vectors (biases) ``N(0, 0.05^2)``. Returns the module in eval mode without gradients."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (gain / fan_in ** 0.5))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval().requires_grad_(False)


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    return module.eval().requires_grad_(False)


# ------------------------------------------------------------------ tokenizers
def clip_tokenizer():
    """A CLIP BPE tokenizer over lowercase letters, digits and punctuation (plus a few merges)."""
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits + ".,!?'-")
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("o", "n</w>"), ("i", "n"), ("a", "t</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = CLIP_MAX_LEN
    return tok


def t5_tokenizer():
    """A unigram T5 tokenizer (pad 0, eos 1, unk 2) over word-initial and inner letters and digits."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + c, -1.0) for c in string.ascii_lowercase + string.digits]
    pieces += [(c, -2.0) for c in string.ascii_lowercase + string.digits + ".,!?'-"]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


# ------------------------------------------------------------------ text encoders
def _clip_config(vocab_size: int, projection: bool):
    from transformers import CLIPTextConfig

    tok = clip_tokenizer()
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=CLIP_DIM, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=CLIP_MAX_LEN,
                          projection_dim=CLIP_PROJ if projection else CLIP_DIM, hidden_act="gelu",
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)


def clip_text_model(seed: int, projection: bool):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    vocab = len(clip_tokenizer())
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return _frozen(cls(_clip_config(vocab, projection)))


def t5_encoder(seed: int, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    vocab = len(t5_tokenizer())
    kw = dict(vocab_size=vocab, d_model=T5_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
              relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0,
              eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(seed)
    if umt5:
        return _frozen(UMT5EncoderModel(UMT5Config(**kw, feed_forward_proj="gated-gelu")))
    return _frozen(T5EncoderModel(T5Config(**kw, feed_forward_proj="gated-gelu")))


# ------------------------------------------------------------------ VAEs
def kl_vae(seed: int, scaling_factor: float, shift_factor: float):
    """AutoencoderKL with 16 latent channels and spatial factor 8 (4 levels), as SD3 and Flux use."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return _frozen(AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                                 up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[4, 4, 4, 4],
                                 layers_per_block=1, latent_channels=16, norm_num_groups=2, sample_size=32,
                                 scaling_factor=scaling_factor, shift_factor=shift_factor,
                                 use_quant_conv=False, use_post_quant_conv=False))


def wan_vae(seed: int):
    """AutoencoderKLWan with 16 latent channels, spatial factor 8 and temporal factor 4."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return _frozen(AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                    temperal_downsample=[False, True, True]))


# ------------------------------------------------------------------ schedulers (published settings)
def sd3_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                                           max_shift=1.15)


def wan_scheduler(flow_shift: float = 3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=flow_shift)


# ------------------------------------------------------------------ transformers (published structure, shrunk)
def tiny_sd3_transformer(layers: int = 2, seed: int = 0, dual_attention_layers=(), qk_norm=None):
    """SD3-medium's ``SD3Transformer2DModel`` (SD3.5: ``qk_norm="rms_norm"``, ``dual_attention_layers``)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_DIM,
                              caption_projection_dim=16, pooled_projection_dim=2 * CLIP_PROJ,
                              pos_embed_max_size=16, dual_attention_layers=tuple(dual_attention_layers),
                              qk_norm=qk_norm)
    return scale_weights(m, seed + 1)


def tiny_flux_transformer(layers: int = 1, single_layers: int = 2, seed: int = 0, guidance_embeds: bool = True):
    """Flux.1's ``FluxTransformer2DModel`` (dev: ``guidance_embeds=True``; schnell: False)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    m = FluxTransformer2DModel(patch_size=1, in_channels=64, out_channels=None, num_layers=layers,
                               num_single_layers=single_layers, attention_head_dim=16, num_attention_heads=2,
                               joint_attention_dim=T5_DIM, pooled_projection_dim=CLIP_DIM,
                               guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
    return scale_weights(m, seed + 1)


def tiny_wan_transformer(layers: int = 2, seed: int = 0):
    """Wan 2.1 T2V's ``WanTransformer3DModel``."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                              out_channels=16, text_dim=T5_DIM, freq_dim=32, ffn_dim=32, num_layers=layers,
                              cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)
    return scale_weights(m, seed + 1)


# ------------------------------------------------------------------ pipelines
def tiny_sd3_pipeline(seed: int = 0, layers: int = 2, **transformer_kw):
    """``StableDiffusion3Pipeline``: two CLIP-with-projection encoders, a T5, a 16-channel VAE, shift 3.0."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(layers=layers, seed=seed, **transformer_kw), scheduler=sd3_scheduler(),
        vae=kl_vae(seed + 10, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=clip_text_model(seed + 20, projection=True), tokenizer=clip_tokenizer(),
        text_encoder_2=clip_text_model(seed + 21, projection=True), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(seed + 22), tokenizer_3=t5_tokenizer())


def tiny_flux_pipeline(seed: int = 0, layers: int = 1, single_layers: int = 2, guidance_embeds: bool = True):
    """``FluxPipeline`` (Flux.1-dev layout by default): CLIP + T5, packed 2x2 latents, dynamic shift."""
    from diffusers import FluxPipeline

    return FluxPipeline(
        transformer=tiny_flux_transformer(layers=layers, single_layers=single_layers, seed=seed,
                                          guidance_embeds=guidance_embeds),
        scheduler=flux_scheduler(), vae=kl_vae(seed + 10, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=clip_text_model(seed + 20, projection=False), tokenizer=clip_tokenizer(),
        text_encoder_2=t5_encoder(seed + 22), tokenizer_2=t5_tokenizer())


def tiny_wan_pipeline(seed: int = 0, layers: int = 2, flow_shift: float = 3.0):
    """``WanPipeline`` (Wan 2.1 T2V): UMT5, 3-D causal VAE, flow-matching Euler with Wan's flow shift."""
    from diffusers import WanPipeline

    return WanPipeline(tokenizer=t5_tokenizer(), text_encoder=t5_encoder(seed + 22, umt5=True),
                       vae=wan_vae(seed + 10), scheduler=wan_scheduler(flow_shift),
                       transformer=tiny_wan_transformer(layers=layers, seed=seed))


PROMPTS = ["a red fox in the snow", "the city at night"]

# settings each tiny pipeline is called with in the tests (small images; short T5 prompts)
CALL_KW = {
    "sd3": dict(height=64, width=64, guidance_scale=4.5, max_sequence_length=32),
    "flux": dict(height=64, width=128, guidance_scale=3.5, max_sequence_length=32),
    "wan": dict(height=32, width=32, num_frames=5, guidance_scale=5.0, max_sequence_length=32),
}

BUILDERS = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline, "wan": tiny_wan_pipeline}


def run_pipeline(pipe, family: str, steps: int = 3, seed: int = 0, prompts=None, **overrides):
    """Sample ``prompts`` with ``pipe`` from a seeded generator; returns the final latents (fp32)."""
    kw = dict(CALL_KW[family], **overrides)
    prompts = list(PROMPTS if prompts is None else prompts)
    out = pipe(prompt=prompts, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
               output_type="latent", **kw)
    images = out.frames if hasattr(out, "frames") else out.images
    return images.float()
