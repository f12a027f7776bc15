"""Block level in unchanged pipelines: ``l2c.enable`` / ``l2c.summary`` / ``l2c.disable`` on the tiny Flux pipeline (eager,
compiled blocks), and Wan's two transformer calls per step found from the pipeline's ``cache_context("cond")`` /
``("uncond")`` without reading the timestep (as on a GPU), in eager mode and in emulated CUDA graphs; each
against the hook reference of the same reuse."""
from __future__ import annotations

import pytest

import l2c_kernels as l2c
from l2c_kernels import schedules
from l2c_kernels.sampling.mmdit_conditions import pipeline_timesteps
from l2c_kernels.runtime.cached_transformer import compile_blocks
from tests.pipelines.block_reference import hook_reuse
from tests.tiny_pipelines import BUILDERS, CALL_KW, run_pipeline

STEPS = 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def pipe_and_fora(fam):
    pipe = BUILDERS[fam]()
    pipe.set_progress_bar_config(disable=True)
    ts, sampler = pipeline_timesteps(pipe, STEPS, height=CALL_KW[fam]["height"], width=CALL_KW[fam]["width"])
    return pipe, schedules.uniform(pipe.transformer, ts, interval=2)


def max_err(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


@pytest.mark.parametrize("mode", ["eager", "emulate"])
def test_wan_passes_come_from_cache_context_without_reading_the_timestep(mode):
    pipe, sched = pipe_and_fora("wan")
    model = pipe.transformer
    mask = [[e == "C" for e in row] for row in sched.plan]
    full = run_pipeline(pipe, "wan", steps=STEPS)
    with hook_reuse(model, mask, passes=2):  # the reference is told the passes; the module is not
        ref = run_pipeline(pipe, "wan", steps=STEPS)
    fast = compile_blocks(model, sched, timestep_check="off", cuda_graphs="emulate" if mode == "emulate" else False)
    try:
        pipe.transformer = fast
        outs = [run_pipeline(pipe, "wan", steps=STEPS) for _ in range(2)]
    finally:
        pipe.transformer = model
    scale = float(full.abs().max())
    assert max_err(ref, full) > 1e-3 * scale
    for out in outs:
        assert max_err(out, ref) <= 1e-5 * scale
    assert fast.context_passes == {"cond": 0, "uncond": 1}
    sm = fast.summary()
    assert (sm["steps_run"], sm["calls"], sm["passes_per_step"], sm["generations"]) == (2 * STEPS, 4 * STEPS, 2, 2)
    if mode == "emulate":
        assert sm["cuda_graphs"] == 2 * fast.distinct_plans()  # each pass its own caches, so its own graphs
        assert fast._graphs.backend.replays == 4 * STEPS


def test_enable_summary_disable_at_block_level_with_compiled_blocks():
    pipe, sched = pipe_and_fora("flux")
    model, scheduler_cls = pipe.transformer, type(pipe.scheduler)
    mask = [[e == "C" for e in row] for row in sched.plan]
    with hook_reuse(model, mask, passes=1):
        ref = run_pipeline(pipe, "flux", steps=STEPS)
    fast = l2c.enable(pipe, sched, torch_compile=dict(backend="eager"))
    try:
        assert pipe.transformer is fast and type(fast).__name__ == "BlockCachedTransformer"
        outs = [run_pipeline(pipe, "flux", steps=STEPS) for _ in range(2)]
        sm = l2c.summary(pipe)
    finally:
        back = l2c.disable(pipe)
    scale = float(ref.abs().max())
    for out in outs:
        assert max_err(out, ref) <= 1e-5 * scale
    assert sm["level"] == "block" and sm["enabled_on"] == "FluxPipeline"
    assert sm["steps_run"] == 2 * STEPS and sm["generations"] == 2
    assert sm["block_flops_removed"] == pytest.approx(sched.flops_removed_fraction(), abs=1e-4)
    assert sm["plans_used"] == sm["distinct_plans"] == fast.distinct_plans()
    assert sm["compiled_variants"] >= 3 and sm["cuda_graphs"] == 0
    assert back is model and pipe.transformer is model and "set_timesteps" not in vars(pipe.scheduler)
    assert type(pipe.scheduler) is scheduler_cls
