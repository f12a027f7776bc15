"""Sampling trajectories with soft branch caches: what the router trains on.

``soft_rollout`` keeps the whole trajectory in one autograd graph (memory grows with the number of
steps). ``stepwise_rollout`` trains step by step along the student's own trajectory (HarmoniCa's
step-wise denoising training): each step's graph is built, its loss is back-propagated into the
router logits of that step, and the latents, the soft caches and the scheduler's state are detached
before the next step, so memory holds one step's activations plus the carried cache state,
whatever the number of steps. Both run :meth:`Denoiser.run`, the library's one sampling loop.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..adapters import adapter_for
from ..sampling.denoiser import Denoiser, detach_scheduler_state
from .soft_forward import SoftCaches, soft_forward


def _caches(den: Denoiser, forecast: str, branches=None) -> SoftCaches:
    """``branches``: the units learned when not the model's default level (SD3 / Flux branch level)."""
    model = den.transformer
    ad = adapter_for(model, branches)
    return SoftCaches(ad.num_blocks(model), len(ad.branches(model)), forecast, branches=branches)


def soft_rollout(den: Denoiser, x: torch.Tensor, w_all: torch.Tensor | None, keep_path: bool,
                 forecast: str = "none", branches=None) -> tuple:
    """Sample from noise ``x``; ``w_all[s]`` are the compute weights of step s (None: full compute).
    Returns ``(final latents, path)`` (unclamped), differentiable in ``w_all``. ``branches``: see ``_caches``."""
    caches = _caches(den, forecast, branches)
    model = den.transformer

    def call(s, args):
        return soft_forward(model, args, None if w_all is None else w_all[s], caches)

    r = den.run(call, len(den._timesteps), x, keep_path=keep_path, raw=True)
    return r.sample, r.path


def stepwise_rollout(den: Denoiser, x: torch.Tensor, weights: Callable, step_loss: Callable,
                     forecast: str = "none", branches=None) -> torch.Tensor:
    """Step-wise training pass: ``weights(s)`` gives step s's compute weights (a fresh graph from the
    logits, or None for full compute); ``step_loss(s, x_next)`` the loss of the latents after step s
    (a tensor, or None). Each loss is back-propagated at once (gradients accumulate in the logits).
    Returns the final latents (detached, unclamped). ``branches``: see ``_caches``."""
    caches = _caches(den, forecast, branches)
    model = den.transformer

    def call(s, args):
        return soft_forward(model, args, weights(s), caches)

    def after(s, x_next, sched):
        loss = step_loss(s, x_next)
        if loss is not None and loss.requires_grad:
            loss.backward()
        caches.detach_()
        detach_scheduler_state(sched)
        return x_next.detach()

    return den.run(call, len(den._timesteps), x, after_step=after, raw=True).sample
