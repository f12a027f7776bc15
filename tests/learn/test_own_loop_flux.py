"""A Flux user's own sampling loop, through public names only: packed ``(tokens, C)`` latents, the timestep the
transformer takes (``t / 1000``), CFG halves in either order; on FLUX.1-dev's published config (2 + 2 blocks).

The reference is the loop written out by hand (Euler flow matching, the transformer called on the doubled batch,
guidance applied to the halves in the order the conditions hold them); the learner's full-compute sampling must
reproduce it, and the schedule it learns must run through ``compile_schedule`` in that same loop.
"""
from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import l2c_kernels as l2c
from l2c_kernels.learn import denoiser_for
from tests.family_configs import FAMILIES

FLUX = FAMILIES["flux-dev"]
STEPS, CFG, N = 4, 2.5, 2
TOKENS, CHANNELS = 16, 64


def conditions(cond_first: bool) -> dict:
    """Keyword arguments of one call on the model batch: unconditional and conditional text states, in order."""
    uncond, cond = FLUX.inputs(N, 0), FLUX.inputs(N, 1)
    first, second = (cond, uncond) if cond_first else (uncond, cond)
    return dict(encoder_hidden_states=torch.cat([first["encoder_hidden_states"], second["encoder_hidden_states"]]),
                pooled_projections=torch.cat([first["pooled_projections"], second["pooled_projections"]]),
                img_ids=cond["img_ids"], txt_ids=cond["txt_ids"], guidance=torch.full((2 * N,), 3.5))


def hand_loop(model, transformer, noise, cond_first: bool) -> torch.Tensor:
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(STEPS)
    x, args = noise.clone(), conditions(cond_first)
    for t in sched.timesteps:
        out = transformer(hidden_states=torch.cat([x, x]), timestep=torch.full((2 * N,), float(t)) / 1000,
                          return_dict=False, **args)[0]
        a, b = out.chunk(2)
        uncond, cond = (b, a) if cond_first else (a, b)
        x = sched.step(uncond + CFG * (cond - uncond), t, x).prev_sample
    return x


@pytest.mark.parametrize("cond_first", [False, True])
def test_the_learners_sampling_is_the_users_loop(cond_first):
    model = FLUX.build()
    den = denoiser_for(model, N, CFG, FlowMatchEulerDiscreteScheduler(), conditions=conditions(cond_first),
                       latent_shape=(TOKENS, CHANNELS), cond_first=cond_first, model_timestep=lambda t: t / 1000)
    assert den.image_tokens == TOKENS
    noise = den.noise(3)
    with torch.no_grad():
        got, _ = den.sample_with(model, STEPS, noise)
        want = hand_loop(model, model, noise, cond_first)
    # the same float32 operations in the same order: equal to rounding (1e-5 of the latents' scale)
    assert torch.allclose(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_a_schedule_learned_in_the_users_form_runs_in_the_users_loop():
    model = FLUX.build()
    sched = l2c.learn_schedule(model, STEPS, 0.5, scheduler=FlowMatchEulerDiscreteScheduler(), guidance_scale=CFG,
                               conditions=conditions(True), latent_shape=(TOKENS, CHANNELS), cond_first=True,
                               model_timestep=lambda t: t / 1000, iterations=2, batch_size=N,
                               calibration_samples=2, progress=False)
    sched.validate_for(model)
    assert sched.is_block_level and sched.flops_removed_fraction() >= 0.5 - 1e-9
    noise = torch.randn(N, TOKENS, CHANNELS, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cached = hand_loop(model, l2c.compile_schedule(model, sched), noise, True)
        full = hand_loop(model, model, noise, True)
    assert torch.isfinite(cached).all() and not torch.equal(cached, full)


def test_a_timestep_map_that_is_not_callable_is_named():
    with pytest.raises(TypeError, match="model_timestep must map a scheduler timestep tensor"):
        denoiser_for(FLUX.build(), N, CFG, FlowMatchEulerDiscreteScheduler(), conditions=conditions(False),
                     latent_shape=(TOKENS, CHANNELS), model_timestep=1000)
