"""The one sampling loop of the library, and what it needs to know about a model's conditioning.

A :class:`Denoiser` holds a transformer, the keyword arguments of one model call for the whole
(classifier-free-guidance) batch, the latent shape, a scheduler factory and the guidance rule.
:meth:`Denoiser.run` is the loop every part of the library samples with: ``sampling.sample``, the
learner's soft rollouts, candidate measurements, T-GATE's gate selection and the change curves.
What is called at each step is a function ``call(step, args) -> model output``: the plain
transformer, a compiled schedule, or the router's soft forward.

The loop follows the diffusers pipelines: latents in float32 scaled by ``init_noise_sigma``;
``scale_model_input`` on the (doubled) batch; the timestep broadcast over the batch; guidance
``uncond + g (cond - uncond)`` on the halves in the order the pipeline uses; a learned-sigma output
(``out_channels == 2 * in_channels``) keeps its first half; ``scheduler.step``. Nothing is clamped
unless the denoiser says so (``output_range``: the bundled pixel-space models).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .schedulers import set_timesteps_kwargs


@dataclass
class Sampled:
    """What :meth:`Denoiser.run` returns."""

    sample: torch.Tensor            # the final latents [N, C, H, W] (float32)
    timesteps: list                 # the scheduler's timesteps in call order (floats)
    path: list = field(default_factory=list)   # latents after every step, with keep_path=True


@dataclass
class Denoiser:
    """A model, its conditioning for one batch, and how to sample it."""

    transformer: torch.nn.Module
    cond_args: dict            # transformer kwargs for the whole model batch (without hidden_states / timestep)
    latent_shape: tuple        # per sample: (C, H, W), packed (tokens, C), video (C, F, H, W)
    make_scheduler: Callable   # () -> a fresh diffusers scheduler
    cfg: float                 # guidance scale; <= 1: no guidance, the model batch is the sample batch
    num_samples: int
    cond_first: bool = False   # order of the CFG halves in the model batch (DiTPipeline: conditional first)
    output_range: tuple | None = None   # clamp the final sample to this range (pixel-space models only)
    text_tokens: int = 0       # tokens of the text condition (FLOPs of cross-attention)
    patch_size: int = 1        # latent pixels per token side (token count of the image)
    model_timestep: Callable | None = None   # scheduler timestep tensor -> what the model takes (default: as is)
    redraw: Callable | None = None   # seed -> a Denoiser with new conditions (labels / captions), or None
    info: dict = field(default_factory=dict)   # what was built: pipeline, labels, prompts, scheduler name

    # -- facts ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def image_tokens(self) -> int:
        """Tokens the transformer sees per sample: packed ``(tokens, C)`` latents as they are, ``(C, H, W)`` in
        ``patch_size`` squares, ``(C, F, H, W)`` video per frame."""
        shape = self.latent_shape
        if len(shape) == 2:
            return int(shape[0])
        frames = 1
        for f in shape[1:-2]:
            frames *= int(f)
        return frames * (shape[-2] // self.patch_size) * (shape[-1] // self.patch_size)

    def scheduler(self, num_inference_steps: int):
        """A fresh scheduler with its timesteps set (flow matching: shifted for this image size)."""
        sched = self.make_scheduler()
        sched.set_timesteps(num_inference_steps, **set_timesteps_kwargs(sched, num_inference_steps, self.image_tokens))
        return sched

    def timesteps(self, num_inference_steps: int) -> list:
        return [float(t) for t in self.scheduler(num_inference_steps).timesteps]

    def noise(self, seed: int, num_samples: int | None = None) -> torch.Tensor:
        """Starting noise: sample ``i`` depends only on ``seed`` and ``i`` (CPU generator, float32)."""
        g = torch.Generator().manual_seed(int(seed))
        return torch.randn((num_samples or self.num_samples, *self.latent_shape), generator=g)

    # -- one step's pieces ----------------------------------------------------------------
    def batch(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x]) if self.cfg > 1.0 else x

    def guided(self, out: torch.Tensor) -> torch.Tensor:
        """Split a learned-sigma output and apply guidance: the noise (or velocity) prediction per sample."""
        c = self.latent_shape[0]
        if out.shape[1] != c:
            if out.shape[1] != 2 * c:
                raise ValueError(f"the model predicts {out.shape[1]} channels for {c}-channel latents")
            out = out[:, :c]   # learned sigma: keep the noise prediction, as the pipelines do
        if self.cfg <= 1.0:
            return out
        first, second = out.chunk(2)
        uncond, cond = (second, first) if self.cond_first else (first, second)
        return uncond + self.cfg * (cond - uncond)

    def model_args(self, x_in: torch.Tensor, t) -> dict:
        tt = t.to(x_in.device).reshape(1).expand(x_in.shape[0])
        if self.model_timestep is not None:
            tt = self.model_timestep(tt)
        return dict(self.cond_args, hidden_states=x_in.to(self.dtype), timestep=tt)

    # -- the loop ---------------------------------------------------------------------
    def run(self, call, num_inference_steps: int, noise: torch.Tensor, *, after_step: Callable | None = None,
            keep_path: bool = False, raw: bool = False, start: int = 0, stop: int | None = None,
            scheduler=None) -> Sampled:
        """Sample from ``noise`` (``[N, C, H, W]``, N = ``num_samples``).

        ``call``: a module of the transformer's signature (the model, a compiled schedule), or a
        function ``(step, args) -> output tensor``. ``after_step(step, x, scheduler) -> x`` sees the
        latents after every step and may replace them (detach, record). Gradients flow unless the caller disables them.
        ``raw``: skip the final clamp to ``output_range`` (training losses).

        A part of the trajectory: ``start`` > 0 runs steps ``start .. stop - 1`` only (``stop``: default the last
        step), ``noise`` being the latents the step ``start`` takes (not scaled), ``scheduler`` the sampler in the
        state it has before that step (a copy: see :meth:`scheduler_states`). The clamp then applies only when the
        part ends with the last step.
        """
        if tuple(noise.shape[1:]) != tuple(self.latent_shape) or noise.shape[0] != self.num_samples:
            raise ValueError(f"noise must have shape {(self.num_samples, *self.latent_shape)}, "
                             f"got {tuple(noise.shape)}")
        stop = num_inference_steps if stop is None else stop
        if not 0 <= start < stop <= num_inference_steps:
            raise ValueError(f"start and stop must satisfy 0 <= start < stop <= {num_inference_steps}, "
                             f"got start={start}, stop={stop}")
        if start > 0 and scheduler is None:
            raise ValueError("a run that starts after step 0 needs the scheduler's state before that step "
                             "(scheduler=, see Denoiser.scheduler_states)")
        fn = call
        if isinstance(call, torch.nn.Module):
            if hasattr(call, "reset"):
                call.reset()
            fn = lambda s, args: call(**args).sample  # noqa: E731
        sched = self.scheduler(num_inference_steps) if scheduler is None else scheduler
        # flow-matching schedulers have neither: their pipelines start from unit noise and feed latents as they are
        x = noise.to(self.device, torch.float32)
        if start == 0:
            x = x * getattr(sched, "init_noise_sigma", 1.0)
        scale_input = getattr(sched, "scale_model_input", None) or (lambda sample, t: sample)
        path = []
        for s, t in enumerate(sched.timesteps):
            if s < start or s >= stop:
                continue
            inp = scale_input(self.batch(x), t)
            out = fn(s, self.model_args(inp, t)).float()
            x = sched.step(self.guided(out), t, x, return_dict=False)[0]
            if after_step is not None:
                x = after_step(s, x, sched)
            if keep_path:
                path.append(x)
        if self.output_range is not None and not raw and stop == num_inference_steps:
            x = x.clamp(*self.output_range)
        return Sampled(x, [float(t) for t in sched.timesteps], path)

    def scheduler_states(self, num_inference_steps: int, noise: torch.Tensor, call=None) -> tuple:
        """Full compute (or ``call``) from ``noise`` without gradients: ``(inputs, states)``, ``inputs[s]`` the
        latents step ``s`` takes (``inputs[n]``: the final ones, unclamped) and ``states[s]`` a copy of the scheduler
        before step ``s``, so that :meth:`run` can start at any step of this trajectory."""
        import copy

        states, inputs = [], []

        def after(s, x, sched):
            states.append(copy.deepcopy(sched))
            inputs.append(x)
            return x

        sched0 = self.scheduler(num_inference_steps)
        x0 = noise.to(self.device, torch.float32) * getattr(sched0, "init_noise_sigma", 1.0)
        with torch.no_grad():
            self.run(self.transformer if call is None else call, num_inference_steps, noise, after_step=after,
                     raw=True, scheduler=copy.deepcopy(sched0))
        return [x0] + inputs, [sched0] + states[:-1]

    def sample_with(self, transformer, num_inference_steps: int, noise: torch.Tensor, record=None) -> tuple:
        """``(final samples, timesteps)`` with ``transformer`` (no gradients); ``record(step)`` after each call."""
        def after(s, x, _):
            if record is not None:
                record(s)
            return x

        with torch.no_grad():
            r = self.run(transformer, num_inference_steps, noise, after_step=after)
        return r.sample, r.timesteps


def detach_scheduler_state(sched) -> None:
    """Detach every tensor a multistep scheduler keeps between steps (DPM-Solver's previous outputs):
    step-wise training frees each step's graph."""
    for k, v in vars(sched).items():
        if isinstance(v, torch.Tensor) and v.requires_grad:
            setattr(sched, k, v.detach())
        elif isinstance(v, list) and any(isinstance(e, torch.Tensor) and e.requires_grad for e in v):
            setattr(sched, k, [e.detach() if isinstance(e, torch.Tensor) else e for e in v])
