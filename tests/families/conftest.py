"""Shared helpers for the per-family tests: models built once per session, a few-step flow sampler."""
from __future__ import annotations

import functools

import pytest
import torch

from tests.family_configs import FAMILIES

TIMESTEPS = [1000, 800, 600, 400, 200]  # sampler timesteps of a 5-step flow-matching generation


@functools.lru_cache(maxsize=None)
def built(name: str):
    return FAMILIES[name].build(seed=0)


def generate(call, family, timesteps=TIMESTEPS, batch=2, seed=0):
    """A whole generation with Euler flow steps: each step's latents come from the previous step's output,
    as a sampler gives them. ``call(step, kwargs)`` runs the transformer; returns every step's output."""
    x = family.latents(batch, seed)
    cond = family.inputs(batch, seed)
    outs = []
    for k, t in enumerate(timesteps):
        out = call(k, family.call_kwargs(x, t, cond))[0]
        outs.append(out)
        nxt = timesteps[k + 1] if k + 1 < len(timesteps) else 0
        dt = (nxt - t) / 1000.0
        if out.ndim == x.ndim and out.shape[1] > x.shape[1]:  # learned sigma: the first channels are the prediction
            x = x + dt * out[:, :x.shape[1]]
        elif out.ndim == x.ndim and out.shape[1] < x.shape[1]:  # conditioning channels after the latents (HunyuanVideo-1.5)
            x = torch.cat([x[:, :out.shape[1]] + dt * out, x[:, out.shape[1]:]], dim=1)
        else:
            x = x + dt * out
    return outs


def max_err(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # tests/conftest.py
    yield
