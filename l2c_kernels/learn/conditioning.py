"""Classifier-free-guidance batches for the models the learner supports."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Denoiser:
    """What a sampling rollout needs: the transformer, its CFG inputs, latent shape and a scheduler factory."""

    transformer: torch.nn.Module
    cond_args: dict            # transformer kwargs for the batch [uncond; cond] (without hidden_states/timestep)
    latent_shape: tuple        # per sample (C, H, W)
    make_scheduler: Callable   # () -> a fresh diffusers scheduler
    cfg: float
    num_samples: int

    def guided(self, out: torch.Tensor) -> torch.Tensor:
        if self.cfg <= 1.0:
            return out
        uncond, cond = out.chunk(2)
        return uncond + self.cfg * (cond - uncond)

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x]) if self.cfg > 1.0 else x

    def sample_with(self, transformer, num_inference_steps: int, noise: torch.Tensor, record=None) -> tuple:
        """Sample with ``transformer`` (the model, or a compiled schedule of it) from ``noise``; returns the
        final samples clamped to [-1, 1] and the timesteps. ``record(step)`` is called after every call."""
        sched = self.make_scheduler()
        sched.set_timesteps(num_inference_steps)
        dev = next(self.transformer.parameters()).device
        dtype = next(self.transformer.parameters()).dtype
        x = noise.to(dev, torch.float32) * sched.init_noise_sigma
        if hasattr(transformer, "reset"):
            transformer.reset()
        for s, t in enumerate(sched.timesteps):
            inp = sched.scale_model_input(self.batch(x), t)
            ts = t.to(dev).reshape(1).expand(inp.shape[0])
            pred = transformer(inp.to(dtype), timestep=ts, **self.cond_args).sample.float()
            if pred.shape[1] != x.shape[1]:  # learned sigma
                pred = pred[:, : x.shape[1]]
            x = sched.step(self.guided(pred), t, x).prev_sample
            if record is not None:
                record(s)
        return x.clamp(-1, 1), [float(t) for t in sched.timesteps]


def _labels(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 10, (n,), generator=g).tolist()


def denoiser_for(obj, num_samples: int, cfg: float, scheduler: str, seed: int = 0,
                 labels=None, prompts=None) -> Denoiser:
    """Build a :class:`Denoiser` from a bundled model (or its name) or a DiT / PixArt diffusers pipeline."""
    from ..models import BundledModel
    from ..models import load as load_model
    from ..sampling import make_scheduler

    if isinstance(obj, str):
        obj = load_model(obj)
    if isinstance(obj, BundledModel):
        tr = obj.transformer
        sc = dict(obj.scheduler_config)
        factory = lambda: make_scheduler(sc, scheduler)  # noqa: E731
        dev = tr.device
        if obj.text_encoder is None:
            lab = list(labels) if labels is not None else _labels(num_samples, seed)
            cond = torch.tensor(lab, device=dev)
            null = torch.full_like(cond, 1000)
            args = dict(class_labels=torch.cat([null, cond]) if cfg > 1 else cond)
        else:
            from ..models.text_encoder import caption_for

            if prompts is None:
                lab = list(labels) if labels is not None else _labels(num_samples, seed)
                prompts = [caption_for(l, i) for i, l in enumerate(lab)]
            caps = ([""] * len(prompts) + list(prompts)) if cfg > 1 else list(prompts)
            enc, mask = obj.text_encoder.encode(caps, device=dev, dtype=tr.dtype)
            args = dict(encoder_hidden_states=enc, encoder_attention_mask=mask,
                        added_cond_kwargs={"resolution": None, "aspect_ratio": None})
        shape = (tr.config.in_channels, tr.config.sample_size, tr.config.sample_size)
        return Denoiser(tr, args, shape, factory, cfg, num_samples if prompts is None else len(prompts))
    # a diffusers pipeline
    pipe = obj
    tr = getattr(pipe.transformer, "original_model", pipe.transformer)
    sc_cls, sc_cfg = type(pipe.scheduler), dict(pipe.scheduler.config)
    factory = lambda: sc_cls.from_config(sc_cfg)  # noqa: E731
    shape = (tr.config.in_channels, tr.config.sample_size, tr.config.sample_size)
    dev = tr.device
    name = type(pipe).__name__
    if name == "DiTPipeline":
        lab = list(labels) if labels is not None else _labels(num_samples, seed)
        cond = torch.tensor(lab, device=dev)
        args = dict(class_labels=torch.cat([cond, torch.full_like(cond, 1000)]) if cfg > 1 else cond)
        d = Denoiser(tr, args, shape, factory, cfg, len(lab))
        # DiTPipeline puts the conditional half first
        d.guided = lambda out: out if cfg <= 1 else (lambda c, u: u + cfg * (c - u))(*out.chunk(2))
        return d
    if name.startswith("PixArt"):
        if prompts is None:
            raise ValueError("learning a schedule on a PixArt pipeline needs calibration prompts (prompts=[...])")
        pe, pm, ne, nm = pipe.encode_prompt(list(prompts), do_classifier_free_guidance=cfg > 1, device=dev)[:4]
        enc = torch.cat([ne, pe]) if cfg > 1 else pe
        mask = torch.cat([nm, pm]) if cfg > 1 else pm
        args = dict(encoder_hidden_states=enc, encoder_attention_mask=mask,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
        return Denoiser(tr, args, shape, factory, cfg, len(prompts))
    raise TypeError(f"learn_schedule supports bundled models, DiTPipeline and PixArt pipelines; got {name}")
