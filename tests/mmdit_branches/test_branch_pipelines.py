"""Branch-level schedules inside the unchanged tiny StableDiffusion3Pipeline (CFG: both guidance halves in one
batch, SD3.5 dual attention in block 0) and FluxPipeline (Flux.1-dev layout: guidance embedding, packed
latents, RoPE): all-compute reproduces each pipeline; a random branch schedule with a quadratic forecast
equals the forward-hook reference run inside the same pipeline."""
from __future__ import annotations

import random

import pytest
import torch

import l2c_kernels as l2c
from l2c_kernels.adapters.mmdit_branches import branch_names
from l2c_kernels.sampling.mmdit_conditions import pipeline_timesteps
from tests.mmdit_branches.hook_reference import HookBranchReference
from tests.tiny_pipelines import CALL_KW, run_pipeline, tiny_flux_pipeline, tiny_sd3_pipeline

STEPS = 4
BUILD = {"sd3": lambda: tiny_sd3_pipeline(dual_attention_layers=(0,), qk_norm="rms_norm"),
         "flux": lambda: tiny_flux_pipeline(layers=2, single_layers=2)}


@pytest.fixture(scope="module")
def pipes():
    out = {}
    for fam, build in BUILD.items():
        p = build()
        p.set_progress_bar_config(disable=True)
        out[fam] = p
    return out


def max_err(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


def timesteps(pipe, fam):
    return pipeline_timesteps(pipe, STEPS, height=CALL_KW[fam]["height"], width=CALL_KW[fam]["width"])


def run_with(pipe, fam, transformer):
    model = pipe.transformer
    try:
        pipe.transformer = transformer
        return run_pipeline(pipe, fam, steps=STEPS)
    finally:
        pipe.transformer = model


@pytest.mark.parametrize("fam", ["sd3", "flux"])
def test_all_compute_reproduces_the_pipeline(pipes, fam):
    pipe = pipes[fam]
    model = pipe.transformer
    assert fam == "flux" and model.config.guidance_embeds or fam == "sd3" and CALL_KW["sd3"]["guidance_scale"] > 1
    ts, sampler = timesteps(pipe, fam)
    sched = l2c.Schedule.full(model, ts, branches=branch_names(model), sampler=sampler)
    ref = run_pipeline(pipe, fam, steps=STEPS)
    out = run_with(pipe, fam, l2c.compile_schedule(model, sched))
    assert max_err(out, ref) <= 1e-5


@pytest.mark.parametrize("fam", ["sd3", "flux"])
def test_random_forecast_schedule_equals_hook_reference_in_the_pipeline(pipes, fam):
    pipe = pipes[fam]
    model = pipe.transformer
    ts, sampler = timesteps(pipe, fam)
    names = branch_names(model)
    nb = len(l2c.Schedule.full(model, ts, branches=names).plan[0])
    rng = random.Random(7)
    mask = [[[s == 0 or rng.random() < 0.5 for _ in names] for _ in range(nb)] for s in range(STEPS)]
    sched = l2c.Schedule.from_mask(model, ts, mask, branches=names, forecast="quadratic", sampler=sampler)
    full = run_pipeline(pipe, fam, steps=STEPS)
    with HookBranchReference(model, sched).installed():
        ref = run_pipeline(pipe, fam, steps=STEPS)
    fast = l2c.compile_schedule(model, sched)
    out = run_with(pipe, fam, fast)
    again = run_with(pipe, fam, fast)  # a new generation restarts the schedule
    scale = float(full.abs().max())
    assert max_err(ref, full) > 1e-3 * scale
    assert max_err(out, ref) <= 1e-5 * scale
    assert torch.equal(out, again)
