"""diffusers transformer families built from their published configs, small enough for CPU tests.

Each entry copies the published ``config.json`` of a released checkpoint (the model id is in
``source``) and changes only sizes, never structure:
- ``num_layers`` / ``num_single_layers`` (and the like) cut to 1-2 blocks of each kind;
- ``num_attention_heads`` cut to 2 (sometimes 1 or 3) -- the head dimension, RoPE axes, norms, patch
  sizes, channel counts and every structural switch stay as published; widths that must equal
  heads x head_dim (SD3's ``caption_projection_dim``, ...) follow;
- large text/feed-forward widths (``joint_attention_dim`` 4096, ``ffn_dim``) cut where the test would
  otherwise spend its time in one projection; each such change is listed in ``shrunk``.

Weights are redrawn seeded with a ``1/sqrt(fan_in)`` scale (diffusers zero-initialises the adaLN and
output projections, which would make every block an identity). ``inputs(batch, seed)`` gives the forward
arguments a pipeline passes besides the latents and the timestep; ``latents(batch, seed)`` the latents;
``to_model_t(t)`` what the family's pipeline passes as timestep for sampler timestep ``t``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


def init_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded weights: matrices N(0, 1/fan_in), norm scales 1 + N(0, 0.1^2), other vectors N(0, 0.05^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval().requires_grad_(False)


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _rand(g, *shape):
    return torch.randn(*shape, generator=g)




@dataclass
class Family:
    name: str
    class_name: str
    source: str
    config: dict
    shrunk: str
    latents: Callable            # (batch, seed) -> latent tensor
    inputs: Callable             # (batch, seed) -> other forward kwargs
    returns: dict = field(default_factory=dict)  # block list (forward order) -> streams its blocks return, in order
    to_model_t: Callable = field(default=lambda t: float(t))
    timestep_arg: str = "timestep"

    def build(self, seed: int = 0):
        import diffusers

        cls = getattr(diffusers, self.class_name)
        return init_weights(cls(**self.config), seed)

    def call_kwargs(self, x, t, cond: dict) -> dict:
        b = x.shape[0]
        return dict(cond, hidden_states=x, **{self.timestep_arg: torch.full((b,), self.to_model_t(t))},
                    return_dict=False)


# ------------------------------------------------------------------ Flux family (MMDiT + single-stream)
def _flux_inputs(img_tokens, txt_tokens, text_dim, pooled=768, guidance=True, ids=True):
    def inputs(batch, seed):
        g = _g(seed + 100)
        d = dict(encoder_hidden_states=_rand(g, batch, txt_tokens, text_dim))
        if pooled:
            d["pooled_projections"] = _rand(g, batch, pooled)
        if ids:
            side = int(img_tokens ** 0.5)
            img_ids = torch.zeros(side, side, 3)
            img_ids[..., 1] = torch.arange(side)[:, None]
            img_ids[..., 2] = torch.arange(side)[None, :]
            d["img_ids"] = img_ids.reshape(-1, 3)
            d["txt_ids"] = torch.zeros(txt_tokens, 3)
        if guidance:
            d["guidance"] = torch.full((batch,), 3.5)
        return d
    return inputs


def _tokens(channels, tokens):
    return lambda batch, seed: _rand(_g(seed), batch, tokens, channels)


def _image(channels, size, frames=None):
    if frames is None:
        return lambda batch, seed: _rand(_g(seed), batch, channels, size, size)
    return lambda batch, seed: _rand(_g(seed), batch, channels, frames, size, size)


FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=[16, 56, 56])


def _shrink(cfg, **kw):
    c = dict(cfg)
    c.update(kw)
    return c


FAMILIES: dict[str, Family] = {}


def _add(f: Family):
    FAMILIES[f.name] = f


# what each block returns, read from the families' forwards (written here apart from the library's table)
EH, HE, H = ("encoder_hidden_states", "hidden_states"), ("hidden_states", "encoder_hidden_states"), ("hidden_states",)


_add(Family("flux-dev", "FluxTransformer2DModel", "black-forest-labs/FLUX.1-dev",
            _shrink(FLUX_DEV, num_layers=2, num_single_layers=2, num_attention_heads=2, joint_attention_dim=64),
            "19/38 -> 2/2 blocks, 24 -> 2 heads (head dim 128, RoPE axes 16/56/56 kept), T5 width 4096 -> 64",
            _tokens(64, 16), _flux_inputs(16, 6, 64), to_model_t=lambda t: t / 1000.0,
            returns={"transformer_blocks": EH, "single_transformer_blocks": EH}))
_add(Family("flux-schnell", "FluxTransformer2DModel", "black-forest-labs/FLUX.1-schnell",
            _shrink(FLUX_DEV, guidance_embeds=False, num_layers=1, num_single_layers=2, num_attention_heads=2,
                    joint_attention_dim=64),
            "19/38 -> 1/2 blocks, 24 -> 2 heads, T5 width 4096 -> 64",
            _tokens(64, 16), _flux_inputs(16, 6, 64, guidance=False), to_model_t=lambda t: t / 1000.0,
            returns={"transformer_blocks": EH, "single_transformer_blocks": EH}))

# ------------------------------------------------------------------ SD3 / SD3.5 (MMDiT)
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)


def _sd3_inputs(txt_tokens, text_dim, pooled):
    def inputs(batch, seed):
        g = _g(seed + 100)
        return dict(encoder_hidden_states=_rand(g, batch, txt_tokens, text_dim),
                    pooled_projections=_rand(g, batch, pooled))
    return inputs


_add(Family("sd3-medium", "SD3Transformer2DModel", "stabilityai/stable-diffusion-3-medium-diffusers",
            _shrink(SD3_MEDIUM, num_layers=2, num_attention_heads=2, caption_projection_dim=128,
                    joint_attention_dim=64),
            "24 -> 2 blocks (the last keeps context_pre_only), 24 -> 2 heads of 64, T5 width 4096 -> 64",
            _image(16, 8), _sd3_inputs(6, 64, 2048), returns={"transformer_blocks": EH}))
_add(Family("sd3.5-large", "SD3Transformer2DModel", "stabilityai/stable-diffusion-3.5-large",
            _shrink(SD3_MEDIUM, num_layers=2, num_attention_heads=2, caption_projection_dim=128,
                    joint_attention_dim=64, qk_norm="rms_norm"),
            "38 -> 2 blocks, 38 -> 2 heads of 64, T5 width 4096 -> 64 (qk rms_norm kept)",
            _image(16, 8), _sd3_inputs(6, 64, 2048), returns={"transformer_blocks": EH}))
_add(Family("sd3.5-medium", "SD3Transformer2DModel", "stabilityai/stable-diffusion-3.5-medium",
            _shrink(SD3_MEDIUM, num_layers=2, num_attention_heads=2, caption_projection_dim=128,
                    joint_attention_dim=64, qk_norm="rms_norm", dual_attention_layers=(0,), pos_embed_max_size=384),
            "24 -> 2 blocks (block 0 keeps its dual attention), 24 -> 2 heads of 64, T5 width 4096 -> 64",
            _image(16, 8), _sd3_inputs(6, 64, 2048), returns={"transformer_blocks": EH}))

# ------------------------------------------------------------------ Wan 2.1 (cross-attention DiT, 3-D latents)
WAN_T2V_13B = dict(patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128, in_channels=16,
                   out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
                   rope_max_seq_len=1024)


def _text(tokens, dim):
    return lambda batch, seed: dict(encoder_hidden_states=_rand(_g(seed + 100), batch, tokens, dim))


_add(Family("wan2.1-t2v", "WanTransformer3DModel", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
            _shrink(WAN_T2V_13B, num_layers=2, num_attention_heads=2, text_dim=64, ffn_dim=512),
            "30 -> 2 blocks, 12 -> 2 heads of 128, UMT5 width 4096 -> 64, ffn 8960 -> 512",
            _image(16, 8, frames=2), _text(6, 64), returns={"blocks": H}))


def _inputs(**makers):
    """kwargs from ``name -> (lambda g, batch: value)``, drawn from one seeded generator in order."""
    def inputs(batch, seed):
        g = _g(seed + 100)
        return {k: f(g, batch) for k, f in makers.items()}
    return inputs


def _ids(side, axes=3, txt=0):
    """Flux-style position ids of a side x side image (axes 1, 2 = row, column), or ``txt`` zero rows."""
    if txt:
        return torch.zeros(txt, axes)
    ids = torch.zeros(side, side, axes)
    ids[..., axes - 2] = torch.arange(side)[:, None]
    ids[..., axes - 1] = torch.arange(side)[None, :]
    return ids.reshape(-1, axes)


def _per_mille(t):
    return t / 1000.0


# ------------------------------------------------------------------ Flux.2 (MMDiT + single-stream, 4-axis RoPE)
_add(Family("flux2-dev", "Flux2Transformer2DModel", "black-forest-labs/FLUX.2-dev",
            dict(patch_size=1, in_channels=128, out_channels=None, num_layers=1, num_single_layers=2,
                 attention_head_dim=128, num_attention_heads=2, joint_attention_dim=64, timestep_guidance_channels=256,
                 mlp_ratio=3.0, axes_dims_rope=[32, 32, 32, 32], rope_theta=2000, eps=1e-6, guidance_embeds=True),
            "8/48 -> 1/2 blocks, 48 -> 2 heads of 128 (4-axis RoPE 32/32/32/32 kept), text width 15360 -> 64",
            _tokens(128, 16),
            _inputs(encoder_hidden_states=lambda g, b: _rand(g, b, 6, 64),
                    img_ids=lambda g, b: _ids(4, 4), txt_ids=lambda g, b: _ids(0, 4, txt=6),
                    guidance=lambda g, b: torch.full((b,), 4.0)),
            returns={"transformer_blocks": EH, "single_transformer_blocks": H}, to_model_t=_per_mille))

# ------------------------------------------------------------------ Qwen-Image (MMDiT, 60 double-stream blocks)
_add(Family("qwen-image", "QwenImageTransformer2DModel", "Qwen/Qwen-Image",
            dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=128,
                 num_attention_heads=2, joint_attention_dim=64, guidance_embeds=False, axes_dims_rope=[16, 56, 56]),
            "60 -> 2 blocks, 24 -> 2 heads of 128 (RoPE 16/56/56 kept), Qwen2.5-VL width 3584 -> 64",
            _tokens(64, 16),
            _inputs(encoder_hidden_states=lambda g, b: _rand(g, b, 6, 64),
                    encoder_hidden_states_mask=lambda g, b: torch.ones(b, 6, dtype=torch.long),
                    img_shapes=lambda g, b: [[(1, 4, 4)]] * b),
            returns={"transformer_blocks": EH}, to_model_t=_per_mille))

# ------------------------------------------------------------------ Chroma (Flux-shaped, pruned modulation)
_add(Family("chroma", "ChromaTransformer2DModel", "lodestones/Chroma1-HD",
            dict(patch_size=1, in_channels=64, out_channels=None, num_layers=1, num_single_layers=2,
                 attention_head_dim=128, num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=[16, 56, 56],
                 approximator_num_channels=64, approximator_hidden_dim=128, approximator_layers=5),
            "19/38 -> 1/2 blocks, 24 -> 2 heads of 128, T5 width 4096 -> 64, approximator width 5120 -> 128",
            _tokens(64, 16),
            _inputs(encoder_hidden_states=lambda g, b: _rand(g, b, 6, 64),
                    img_ids=lambda g, b: _ids(4), txt_ids=lambda g, b: _ids(0, txt=6)),
            returns={"transformer_blocks": EH, "single_transformer_blocks": H}, to_model_t=_per_mille))

# ------------------------------------------------------------------ AuraFlow (MMDiT + single DiT)
_add(Family("auraflow", "AuraFlowTransformer2DModel", "fal/AuraFlow-v0.3",
            dict(sample_size=64, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=2,
                 attention_head_dim=256, num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=512,
                 out_channels=4, pos_embed_max_size=9216),
            "4/32 -> 1/2 blocks, 12 -> 2 heads of 256, Pile-T5 width 2048 -> 64",
            _image(4, 8), _text(6, 64),
            returns={"joint_transformer_blocks": EH, "single_transformer_blocks": H}, to_model_t=_per_mille))

# ------------------------------------------------------------------ HunyuanVideo (MMDiT video: double + single)
_add(Family("hunyuan-video", "HunyuanVideoTransformer3DModel", "hunyuanvideo-community/HunyuanVideo",
            dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=128, num_layers=1,
                 num_single_layers=2, num_refiner_layers=1, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
                 qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=64, pooled_projection_dim=768,
                 rope_theta=256.0, rope_axes_dim=[16, 56, 56]),
            "20/40 -> 1/2 blocks, 2 -> 1 refiner layer, 24 -> 2 heads of 128 (RoPE 16/56/56 kept), Llama width 4096 -> 64",
            _image(16, 8, frames=2),
            _inputs(encoder_hidden_states=lambda g, b: _rand(g, b, 6, 64),
                    encoder_attention_mask=lambda g, b: torch.ones(b, 6),
                    pooled_projections=lambda g, b: _rand(g, b, 768),
                    guidance=lambda g, b: torch.full((b,), 6000.0)),
            returns={"transformer_blocks": HE, "single_transformer_blocks": HE}))

# ------------------------------------------------------------------ CogVideoX-2b (expert-adaLN joint blocks)
_add(Family("cogvideox-2b", "CogVideoXTransformer3DModel", "THUDM/CogVideoX-2b",
            dict(num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16, flip_sin_to_cos=True,
                 freq_shift=0, time_embed_dim=512, text_embed_dim=64, num_layers=2, sample_width=8, sample_height=8,
                 sample_frames=5, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=6,
                 activation_fn="gelu-approximate", timestep_activation_fn="silu", norm_elementwise_affine=True,
                 norm_eps=1e-5, spatial_interpolation_scale=1.875, temporal_interpolation_scale=1.0,
                 use_rotary_positional_embeddings=False, use_learned_positional_embeddings=False),
            "30 -> 2 blocks, 30 -> 2 heads of 64, T5 width 4096 -> 64, sample 49x60x90 -> 5x8x8, 226 -> 6 text tokens",
            lambda batch, seed: _rand(_g(seed), batch, 2, 16, 8, 8), _text(6, 64),
            returns={"transformer_blocks": HE}))

# ------------------------------------------------------------------ CogView3-Plus / CogView4 (joint blocks)
_add(Family("cogview3plus", "CogView3PlusTransformer2DModel", "THUDM/CogView3-Plus-3B",
            dict(patch_size=2, in_channels=16, num_layers=2, attention_head_dim=40, num_attention_heads=2,
                 out_channels=16, text_embed_dim=64, time_embed_dim=512, condition_dim=256, pos_embed_max_size=128,
                 sample_size=128),
            "30 -> 2 blocks, 64 -> 2 heads of 40, T5 width 4096 -> 64",
            _image(16, 8),
            _inputs(encoder_hidden_states=lambda g, b: _rand(g, b, 6, 64),
                    original_size=lambda g, b: torch.tensor([[64.0, 64.0]] * b),
                    target_size=lambda g, b: torch.tensor([[64.0, 64.0]] * b),
                    crop_coords=lambda g, b: torch.zeros(b, 2)),
            returns={"transformer_blocks": HE}))
_add(Family("cogview4", "CogView4Transformer2DModel", "THUDM/CogView4-6B",
            dict(patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=128,
                 num_attention_heads=2, text_embed_dim=64, time_embed_dim=512, condition_dim=256,
                 pos_embed_max_size=128, sample_size=128, rope_axes_dim=[256, 256]),
            "28 -> 2 blocks, 32 -> 2 heads of 128, GLM width 4096 -> 64",
            _image(16, 8),
            _inputs(encoder_hidden_states=lambda g, b: _rand(g, b, 6, 64),
                    original_size=lambda g, b: torch.tensor([[64.0, 64.0]] * b),
                    target_size=lambda g, b: torch.tensor([[64.0, 64.0]] * b),
                    crop_coords=lambda g, b: torch.zeros(b, 2)),
            returns={"transformer_blocks": HE}))

# ------------------------------------------------------------------ Mochi-1 (asymmetric joint blocks)
_add(Family("mochi", "MochiTransformer3DModel", "genmo/mochi-1-preview",
            dict(patch_size=2, num_attention_heads=2, attention_head_dim=128, num_layers=2, pooled_projection_dim=1536,
                 in_channels=12, out_channels=None, qk_norm="rms_norm", text_embed_dim=64, time_embed_dim=256,
                 activation_fn="swiglu", max_sequence_length=256),
            "48 -> 2 blocks (the last keeps context_pre_only), 24 -> 2 heads of 128, T5 width 4096 -> 64",
            _image(12, 8, frames=2),
            _inputs(encoder_hidden_states=lambda g, b: _rand(g, b, 6, 64),
                    encoder_attention_mask=lambda g, b: torch.ones(b, 6)),
            returns={"transformer_blocks": HE}))

# ------------------------------------------------------------------ LTX-Video (cross-attention DiT, packed tokens)
_add(Family("ltx-video", "LTXVideoTransformer3DModel", "Lightricks/LTX-Video",
            dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=2,
                 attention_head_dim=64, cross_attention_dim=128, num_layers=2, activation_fn="gelu-approximate",
                 qk_norm="rms_norm_across_heads", norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=64,
                 attention_bias=True, attention_out_bias=True),
            "28 -> 2 blocks, 32 -> 2 heads of 64 (cross-attention width follows), T5 width 4096 -> 64",
            _tokens(128, 2 * 4 * 4),
            _inputs(encoder_hidden_states=lambda g, b: _rand(g, b, 6, 64),
                    encoder_attention_mask=lambda g, b: torch.ones(b, 6),
                    num_frames=lambda g, b: 2, height=lambda g, b: 4, width=lambda g, b: 4),
            returns={"transformer_blocks": H}))

# ------------------------------------------------------------------ Sana (linear-attention DiT + cross-attention)
_add(Family("sana-1600m", "SanaTransformer2DModel", "Efficient-Large-Model/Sana_1600M_1024px_diffusers",
            dict(in_channels=32, out_channels=32, num_attention_heads=7, attention_head_dim=32, num_layers=2,
                 num_cross_attention_heads=2, cross_attention_head_dim=112, cross_attention_dim=224,
                 caption_channels=64, mlp_ratio=2.5, dropout=0.0, attention_bias=False, sample_size=32, patch_size=1,
                 norm_elementwise_affine=False, norm_eps=1e-6),
            "20 -> 2 blocks, 70 -> 7 heads of 32 and 20 -> 2 cross-attention heads of 112 (widths 2240 -> 224), "
            "Gemma width 2304 -> 64",
            _image(32, 8),
            _inputs(encoder_hidden_states=lambda g, b: _rand(g, b, 6, 64),
                    encoder_attention_mask=lambda g, b: torch.ones(b, 6)),
            returns={"transformer_blocks": H}))

# ------------------------------------------------------------------ Lumina-Image 2.0 (joint sequence, GQA)
_add(Family("lumina2", "Lumina2Transformer2DModel", "Alpha-VLLM/Lumina-Image-2.0",
            dict(sample_size=128, patch_size=2, in_channels=16, out_channels=None, hidden_size=288, num_layers=2,
                 num_refiner_layers=1, num_attention_heads=3, num_kv_heads=1, multiple_of=256,
                 ffn_dim_multiplier=None, norm_eps=1e-5, scaling_factor=1.0, axes_dim_rope=[32, 32, 32],
                 axes_lens=[300, 512, 512], cap_feat_dim=64),
            "26 -> 2 layers, 2 -> 1 refiner layers, 24/8 -> 3/1 heads of 96 (hidden 2304 -> 288; RoPE 32/32/32 and "
            "the 3:1 grouped-query ratio kept), Gemma width 2304 -> 64",
            _image(16, 8),
            _inputs(encoder_hidden_states=lambda g, b: _rand(g, b, 6, 64),
                    encoder_attention_mask=lambda g, b: torch.ones(b, 6, dtype=torch.bool)),
            returns={"layers": H}, to_model_t=lambda t: 1.0 - t / 1000.0))

# ------------------------------------------------------------------ Allegro (video DiT + cross-attention)
_add(Family("allegro", "AllegroTransformer3DModel", "rhymes-ai/Allegro",
            dict(patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=96, in_channels=4,
                 out_channels=4, num_layers=2, cross_attention_dim=192, attention_bias=True, sample_height=90,
                 sample_width=160, sample_frames=22, activation_fn="gelu-approximate", norm_elementwise_affine=False,
                 norm_eps=1e-6, caption_channels=64, interpolation_scale_h=2.0, interpolation_scale_w=2.0,
                 interpolation_scale_t=2.2),
            "32 -> 2 blocks, 24 -> 2 heads of 96 (cross-attention width follows), T5 width 4096 -> 64",
            _image(4, 8, frames=2),
            _inputs(encoder_hidden_states=lambda g, b: _rand(g, b, 6, 64),
                    encoder_attention_mask=lambda g, b: torch.ones(b, 6)),
            returns={"transformer_blocks": H}))

# ------------------------------------------------------------------ DiT and PixArt at block level too
_add(Family("dit-xl-2", "DiTTransformer2DModel", "facebook/DiT-XL-2-256",
            dict(num_attention_heads=2, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=2,
                 sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero"),
            "28 -> 2 blocks, 16 -> 2 heads of 72, sample 32 -> 8",
            _image(4, 8), _inputs(class_labels=lambda g, b: torch.randint(0, 1000, (b,), generator=g)),
            returns={"transformer_blocks": H}))
_add(Family("pixart-sigma", "PixArtTransformer2DModel", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
            dict(num_attention_heads=2, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=2,
                 cross_attention_dim=144, caption_channels=64, sample_size=8, patch_size=2, norm_type="ada_norm_single",
                 use_additional_conditions=False, interpolation_scale=2),
            "28 -> 2 blocks, 16 -> 2 heads of 72 (cross-attention width follows), T5 width 4096 -> 64, sample 128 -> 8",
            _image(4, 8),
            _inputs(encoder_hidden_states=lambda g, b: _rand(g, b, 6, 64),
                    encoder_attention_mask=lambda g, b: torch.ones(b, 6),
                    added_cond_kwargs=lambda g, b: {"resolution": None, "aspect_ratio": None}),
            returns={"transformer_blocks": H}))

# ------------------------------------------------------------------ more Flux-shaped and Wan-shaped families
_add(Family("skyreels-v2", "SkyReelsV2Transformer3DModel", "Skywork/SkyReels-V2-T2V-1.3B-540P-Diffusers",
            dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=128, in_channels=16, out_channels=16,
                 text_dim=64, freq_dim=256, ffn_dim=512, num_layers=2, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
                 rope_max_seq_len=1024),
            "30 -> 2 blocks, 12 -> 2 heads of 128, UMT5 width 4096 -> 64, ffn 8960 -> 512",
            _image(16, 8, frames=2), _text(6, 64), returns={"blocks": H}))
_add(Family("ovis-image", "OvisImageTransformer2DModel", "AIDC-AI/Ovis-Image-7B (diffusers' defaults for the class)",
            dict(patch_size=1, in_channels=64, out_channels=64, num_layers=1, num_single_layers=2,
                 attention_head_dim=128, num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=[16, 56, 56]),
            "6/27 -> 1/2 blocks, 24 -> 2 heads of 128 (RoPE 16/56/56 kept), text width 2048 -> 64",
            _tokens(64, 16),
            _inputs(encoder_hidden_states=lambda g, b: _rand(g, b, 6, 64),
                    img_ids=lambda g, b: _ids(4), txt_ids=lambda g, b: _ids(0, txt=6)),
            returns={"transformer_blocks": EH, "single_transformer_blocks": EH}, to_model_t=_per_mille))
_add(Family("longcat-image", "LongCatImageTransformer2DModel",
            "meituan-longcat/LongCat-Image (diffusers' defaults for the class)",
            dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=128,
                 num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=[16, 56, 56]),
            "19/38 -> 1/2 blocks, 24 -> 2 heads of 128, text width 3584 -> 64",
            _tokens(64, 16),
            _inputs(encoder_hidden_states=lambda g, b: _rand(g, b, 6, 64),
                    img_ids=lambda g, b: _ids(4), txt_ids=lambda g, b: _ids(0, txt=6)),
            returns={"transformer_blocks": EH, "single_transformer_blocks": EH}, to_model_t=_per_mille))
_add(Family("hunyuan-image-2.1", "HunyuanImageTransformer2DModel",
            "hunyuanvideo-community/HunyuanImage-2.1-Diffusers (diffusers' defaults for the class)",
            dict(in_channels=64, out_channels=64, num_attention_heads=2, attention_head_dim=128, num_layers=1,
                 num_single_layers=2, num_refiner_layers=1, mlp_ratio=4.0, patch_size=[1, 1], qk_norm="rms_norm",
                 guidance_embeds=False, text_embed_dim=64, rope_theta=256.0, rope_axes_dim=[64, 64]),
            "20/40 -> 1/2 blocks, 2 -> 1 refiner layer, 28 -> 2 heads of 128 (RoPE 64/64 kept), text width 3584 -> 64",
            _image(64, 4),
            _inputs(encoder_hidden_states=lambda g, b: _rand(g, b, 6, 64),
                    encoder_attention_mask=lambda g, b: torch.ones(b, 6)),
            returns={"transformer_blocks": HE, "single_transformer_blocks": HE}))
_add(Family("bria-3.2", "BriaTransformer2DModel", "briaai/BRIA-3.2 (diffusers' defaults for the class)",
            dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=128,
                 num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=None, guidance_embeds=False,
                 axes_dims_rope=[16, 56, 56], rope_theta=10000, time_theta=10000),
            "19/38 -> 1/2 blocks, 24 -> 2 heads of 128, T5 width 4096 -> 64",
            _tokens(64, 16),
            _inputs(encoder_hidden_states=lambda g, b: _rand(g, b, 6, 64),
                    img_ids=lambda g, b: _ids(4), txt_ids=lambda g, b: _ids(0, txt=6)),
            returns={"transformer_blocks": EH, "single_transformer_blocks": EH}))

# ------------------------------------------------------------------ video families with their own block shapes
_add(Family("cosmos-1.0-t2w", "CosmosTransformer3DModel", "nvidia/Cosmos-1.0-Diffusion-7B-Text2World",
            dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=128, num_layers=2,
                 mlp_ratio=4.0, text_embed_dim=64, adaln_lora_dim=256, max_size=(128, 240, 240), patch_size=(1, 2, 2),
                 rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=False, extra_pos_embed_type="learnable"),
            "28 -> 2 blocks, 32 -> 2 heads of 128, T5 width 1024 -> 64; padding-mask channel off (diffusers resizes "
            "the mask with torchvision, which the tests do not install; the blocks are the same)",
            _image(16, 8, frames=2),
            _inputs(encoder_hidden_states=lambda g, b: _rand(g, b, 6, 64), fps=lambda g, b: 30),
            returns={"transformer_blocks": H}))
_add(Family("easyanimate-v5.1", "EasyAnimateTransformer3DModel", "alibaba-pai/EasyAnimateV5.1-7b-zh-diffusers",
            dict(num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16, patch_size=2,
                 sample_width=84, sample_height=84, activation_fn="gelu-approximate", timestep_activation_fn="silu",
                 freq_shift=0, num_layers=2, mmdit_layers=2, time_embed_dim=512, add_norm_text_encoder=False,
                 text_embed_dim=64, norm_eps=1e-5, norm_elementwise_affine=True, flip_sin_to_cos=True,
                 time_position_encoding_type="3d_rope", after_norm=False, resize_inpaint_mask_directly=True,
                 enable_text_attention_mask=True, add_noise_in_inpaint_model=True),
            "48 -> 2 blocks, 48 -> 2 heads of 64, Qwen2-VL width 3584 -> 64",
            _image(16, 8, frames=2),
            _inputs(encoder_hidden_states=lambda g, b: _rand(g, b, 6, 64)),
            returns={"transformer_blocks": HE}))
_add(Family("hunyuan-video-1.5", "HunyuanVideo15Transformer3DModel",
            "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v",
            dict(in_channels=65, out_channels=32, num_attention_heads=2, attention_head_dim=128, num_layers=2,
                 num_refiner_layers=1, mlp_ratio=4.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm",
                 text_embed_dim=64, text_embed_2_dim=32, image_embed_dim=64, rope_theta=256.0,
                 rope_axes_dim=(16, 56, 56), target_size=640, task_type="t2v", use_meanflow=False),
            "54 -> 2 blocks, 2 -> 1 refiner layer, 16 -> 2 heads of 128 (RoPE 16/56/56 kept), "
            "Qwen2.5-VL width 3584 -> 64, ByT5 width 1472 -> 32, SigLIP width 1152 -> 64",
            _image(65, 4, frames=2),
            _inputs(encoder_hidden_states=lambda g, b: _rand(g, b, 6, 64),
                    encoder_attention_mask=lambda g, b: torch.ones(b, 6),
                    encoder_hidden_states_2=lambda g, b: _rand(g, b, 4, 32),
                    encoder_attention_mask_2=lambda g, b: torch.ones(b, 4),
                    image_embeds=lambda g, b: torch.zeros(b, 3, 64)),
            returns={"transformer_blocks": HE}))
