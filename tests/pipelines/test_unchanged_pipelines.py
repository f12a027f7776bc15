"""Unchanged SD3 / Flux / Wan pipelines with a compiled transformer: ``pipe.transformer = compile_schedule(...)``."""
from __future__ import annotations

import pytest
import torch

import l2c_kernels as l2c
from l2c_kernels import schedules
from l2c_kernels.sampling.mmdit_conditions import pipeline_timesteps
from tests.pipelines.block_reference import hook_reuse
from tests.tiny_pipelines import BUILDERS, CALL_KW, run_pipeline

STEPS = 4
FAMILIES = ["sd3", "flux", "wan"]


@pytest.fixture(scope="module")
def pipes():
    out = {}
    for fam in FAMILIES:
        p = BUILDERS[fam]()
        p.set_progress_bar_config(disable=True)
        out[fam] = p
    return out


def schedule_facts(pipe, fam, **size):
    size = size or dict(height=CALL_KW[fam]["height"], width=CALL_KW[fam]["width"])
    return pipeline_timesteps(pipe, STEPS, **size)


def max_err(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


@pytest.mark.parametrize("fam", FAMILIES)
def test_all_compute_schedule_reproduces_the_pipeline(pipes, fam):
    pipe = pipes[fam]
    model = pipe.transformer
    ref = run_pipeline(pipe, fam, steps=STEPS)
    ts, sampler = schedule_facts(pipe, fam)
    sched = l2c.Schedule.full(model, ts, sampler=sampler)
    assert sched.branches == ["block"] and sched.sampler["class"] == "FlowMatchEulerDiscreteScheduler"
    try:
        pipe.transformer = l2c.compile_schedule(model, sched)
        out = run_pipeline(pipe, fam, steps=STEPS)
        assert pipe.transformer.current_step == STEPS - 1
    finally:
        pipe.transformer = model
    assert max_err(out, ref) <= 1e-5


@pytest.mark.parametrize("fam", FAMILIES)
def test_fora_block_schedule_equals_the_hook_reference(pipes, fam):
    pipe = pipes[fam]
    model = pipe.transformer
    ts, sampler = schedule_facts(pipe, fam)
    sched = schedules.uniform(model, ts, interval=2)
    assert sched.flops_removed_fraction() == pytest.approx(0.5)
    mask = [[e == "C" for e in row] for row in sched.plan]
    passes = 2 if fam == "wan" else 1          # WanPipeline calls the transformer once per CFG half
    full = run_pipeline(pipe, fam, steps=STEPS)
    with hook_reuse(model, mask, passes=passes):
        ref = run_pipeline(pipe, fam, steps=STEPS)
    try:
        pipe.transformer = l2c.compile_schedule(model, sched)
        out = run_pipeline(pipe, fam, steps=STEPS)
        again = run_pipeline(pipe, fam, steps=STEPS)   # a new generation restarts the schedule
    finally:
        pipe.transformer = model
    scale = float(full.abs().max())
    assert max_err(ref, full) > 1e-3 * scale          # the reuse changes the result ...
    assert max_err(out, ref) <= 1e-5 * scale          # ... exactly as the reference reuses
    assert torch.equal(out, again)


def test_flux_schedule_at_another_resolution_maps_by_step_index(pipes):
    pipe = pipes["flux"]
    model = pipe.transformer
    ts, sampler = schedule_facts(pipe, "flux")                       # made at 64 x 128
    sched = schedules.uniform(model, ts, interval=2)
    sched.sampler = sampler
    other = dict(height=128, width=128)
    ts2, sampler2 = schedule_facts(pipe, "flux", **other)
    assert ts2[1:] != ts[1:]
    try:
        pipe.transformer = l2c.compile_schedule(model, sched)
        with pytest.raises(l2c.ScheduleError, match=r"made for 4 steps of FlowMatchEulerDiscreteScheduler "
                                                    r"\(shift 3.0, mu 0.4"):
            run_pipeline(pipe, "flux", steps=STEPS, **other)
        pipe.transformer = l2c.compile_schedule(model, sched.retimed(ts2, sampler2))
        out = run_pipeline(pipe, "flux", steps=STEPS, **other)
    finally:
        pipe.transformer = model
    with hook_reuse(model, [[e == "C" for e in row] for row in sched.plan]):
        ref = run_pipeline(pipe, "flux", steps=STEPS, **other)
    assert max_err(out, ref) <= 1e-5 * float(ref.abs().max())


def test_tgate_schedule_is_refused_for_joint_attention(pipes):
    model = pipes["sd3"].transformer
    ts, _ = schedule_facts(pipes["sd3"], "sd3")
    with pytest.raises((l2c.ScheduleError, TypeError, ValueError), match="cross-attention"):
        l2c.compile_schedule(model, schedules.tgate(model, ts, gate_step=2))


@pytest.mark.parametrize("forecast", ["linear", "quadratic"])
def test_forecast_block_schedule_equals_the_hook_reference(pipes, forecast):
    pipe = pipes["flux"]
    model = pipe.transformer
    steps = 6                                            # computed at 0, 2, 4: step 5 has three to extrapolate from
    ts, _ = pipeline_timesteps(pipe, steps, height=CALL_KW["flux"]["height"], width=CALL_KW["flux"]["width"])
    sched = schedules.uniform(model, ts, interval=2, forecast=forecast)
    mask = [[e == "C" for e in row] for row in sched.plan]
    with hook_reuse(model, mask):
        plain = run_pipeline(pipe, "flux", steps=steps)
    with hook_reuse(model, mask, forecast=forecast):
        ref = run_pipeline(pipe, "flux", steps=steps)
    try:
        pipe.transformer = l2c.compile_schedule(model, sched)
        out = run_pipeline(pipe, "flux", steps=steps)
    finally:
        pipe.transformer = model
    scale = float(ref.abs().max())
    assert max_err(plain, ref) > 1e-3 * scale           # the forecast changes the result ...
    assert max_err(out, ref) <= 1e-5 * scale            # ... as the reference extrapolates


def test_bfloat16_flux_pipeline_finds_its_steps():
    """FluxPipeline passes t / 1000 in the latents' dtype: in bf16 the model sees rounded timesteps."""
    pipe = BUILDERS["flux"]().to(torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    model = pipe.transformer
    ref = run_pipeline(pipe, "flux", steps=STEPS)
    ts, sampler = schedule_facts(pipe, "flux")
    pipe.transformer = l2c.compile_schedule(model, l2c.Schedule.full(model, ts, sampler=sampler))
    out = run_pipeline(pipe, "flux", steps=STEPS)
    assert pipe.transformer.current_step == STEPS - 1
    assert torch.equal(out, ref)          # all computed: the same bf16 arithmetic as the pipeline's own
