"""Tiny diffusers transformers with random (non-zero) weights for runtime tests; nothing downloaded."""
from __future__ import annotations

import torch


def _randomize(model, seed: int, std: float = 0.15):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval().requires_grad_(False)


def tiny_dit(layers: int = 3, sample_size: int = 8, seed: int = 0):
    from diffusers import DiTTransformer2DModel

    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                              num_layers=layers, sample_size=sample_size, patch_size=2, num_embeds_ada_norm=1000)
    return _randomize(m, seed)


def tiny_pixart(layers: int = 3, sample_size: int = 8, seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    m = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                 num_layers=layers, sample_size=sample_size, patch_size=2, cross_attention_dim=16,
                                 caption_channels=12, use_additional_conditions=False)
    return _randomize(m, seed)


def dit_inputs(batch=2, size=8, t=981, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g).to(dtype)
    labels = torch.randint(0, 10, (batch,), generator=g)
    return dict(hidden_states=x, timestep=torch.full((batch,), t), class_labels=labels)


def pixart_inputs(batch=2, size=8, t=981, seed=1, dtype=torch.float32, text_tokens=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g).to(dtype)
    enc = torch.randn(batch, text_tokens, 12, generator=g).to(dtype)
    mask = torch.ones(batch, text_tokens)
    mask[0, text_tokens - 2:] = 0
    return dict(hidden_states=x, encoder_hidden_states=enc, encoder_attention_mask=mask,
                timestep=torch.full((batch,), t), added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def inputs_for(model, **kw):
    return dit_inputs(**kw) if type(model).__name__.startswith("DiT") else pixart_inputs(**kw)


def cfg_batch(inputs: dict) -> dict:
    """Make a classifier-free-guidance batch: both halves share latents and timestep."""
    out = dict(inputs)
    b = inputs["hidden_states"].shape[0] // 2
    out["hidden_states"] = torch.cat([inputs["hidden_states"][:b]] * 2)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


class StandIn(torch.nn.Module):
    """A module put in a transformer's place (a reference, a wrapper): answers what pipelines read of the
    transformer (``config``, ``dtype``, ``device``) from ``self.model``."""

    @property
    def config(self):
        return self.model.config

    @property
    def dtype(self):
        return self.model.dtype

    @property
    def device(self):
        return self.model.device
