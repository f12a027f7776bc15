"""Architectures of the bundled models (diffusers configs) and their noise schedule."""
from __future__ import annotations

IMAGE_SIZE = 16

# DDPM noise schedule the models were trained with; the sampling schedulers are built from it.
NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                      prediction_type="epsilon", clip_sample=True, clip_sample_range=1.0)

DIT_DIGITS = dict(
    num_attention_heads=4, attention_head_dim=32, in_channels=1, out_channels=1, num_layers=12,
    sample_size=IMAGE_SIZE, patch_size=2, activation_fn="gelu-approximate",
    # labels 0..9 are digits; DiTPipeline uses label 1000 as the null class, so the table has 1001 rows
    num_embeds_ada_norm=1000, norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_eps=1e-6,
)

TEXT_ENCODER = dict(dim=64, num_layers=2, num_heads=4, max_length=8)

PIXART_DIGITS = dict(
    num_attention_heads=4, attention_head_dim=32, in_channels=1, out_channels=1, num_layers=12,
    cross_attention_dim=128, sample_size=IMAGE_SIZE, patch_size=2, activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    use_additional_conditions=False, caption_channels=TEXT_ENCODER["dim"], interpolation_scale=1,
)

NULL_CLASS = 1000

# flux-digits: a FluxTransformer2DModel on 2x2-packed pixels (1 channel -> 4 channels x 8x8 = 64 tokens, as
# FluxPipeline packs latents), 2 double-stream (MMDiT) and 6 single-stream blocks, hidden 96 (3 heads of 32).
# RoPE over (index, row, col) with 8 + 12 + 12 = 32 = head dim. Text: the caption encoder (64-d tokens) and its masked
# mean as the pooled projection. No guidance embedding: classifier-free guidance (captions dropped in training).
FLUX_DIGITS = dict(
    patch_size=1, in_channels=4, out_channels=None, num_layers=2, num_single_layers=6, attention_head_dim=32,
    num_attention_heads=3, joint_attention_dim=TEXT_ENCODER["dim"], pooled_projection_dim=TEXT_ENCODER["dim"],
    guidance_embeds=False, axes_dims_rope=(8, 12, 12),
)

# flux-heldout: the held-out model of the comparisons (no default of the package is chosen on it): the same family
# and data as flux-digits, another size (1 double-stream and 4 single-stream blocks, hidden 64: 2 heads of 32) and
# another training seed.
FLUX_HELDOUT = dict(FLUX_DIGITS, num_layers=1, num_single_layers=4, num_attention_heads=2)

# rectified flow: x_t = (1 - t) x0 + t noise, the model predicts noise - x0; sampled with
# FlowMatchEulerDiscreteScheduler, no resolution shift (16x16 pixels, 64 tokens).
FLOW_MATCH_SCHEDULE = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
