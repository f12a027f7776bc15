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
