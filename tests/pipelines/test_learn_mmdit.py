"""learn_schedule on the tiny SD3, Flux and Wan pipelines: a block-level schedule that runs in the unchanged pipeline."""
from __future__ import annotations

import pytest
import torch

import l2c_kernels as l2c
from tests.pipelines.block_reference import hook_reuse
from tests.tiny_pipelines import BUILDERS, CALL_KW, PROMPTS, run_pipeline

STEPS = 4


@pytest.mark.parametrize("fam", ["sd3", "flux", "wan"])
def test_learned_block_schedule_runs_in_the_unchanged_pipeline(fam, tmp_path):
    torch.manual_seed(0)
    pipe = BUILDERS[fam]()
    pipe.set_progress_bar_config(disable=True)
    kw = CALL_KW[fam]
    model = pipe.transformer
    sched = l2c.learn_schedule(pipe, num_inference_steps=STEPS, budget=0.4, prompts=PROMPTS, height=kw["height"],
                               width=kw["width"], guidance_scale=kw["guidance_scale"], iterations=4, batch_size=2,
                               max_sequence_length=kw["max_sequence_length"], calibration_samples=2, progress=False)
    assert sched.method == "learned" and sched.branches == ["block"]
    assert sched.model_class == type(model).__name__ and len(sched.unit_flops) == sched.num_blocks
    assert all(e == "C" for e in sched.plan[0])                     # the first step fills every cache
    # all three sample with flow matching: warm_up="auto" gives the router's candidates 10% of the steps, at least 2,
    # in full -- at 4 steps and 40%, steps 0 and 1; the step search measures sets with and without it
    assert sched.params["warm_up"] == 2
    assert 0.0 < sched.flops_removed_fraction() < 1.0
    sched.validate_for(model)
    sched.save(tmp_path / "s.l2c.json")
    loaded = l2c.Schedule.load(tmp_path / "s.l2c.json")
    assert loaded.plan == sched.plan and loaded.timesteps == sched.timesteps

    passes = 2 if fam == "wan" else 1
    with hook_reuse(model, [[e == "C" for e in row] for row in loaded.plan], passes=passes, forecast=loaded.forecast):
        ref = run_pipeline(pipe, fam, steps=STEPS)
    try:
        pipe.transformer = l2c.compile_schedule(model, loaded)
        out = run_pipeline(pipe, fam, steps=STEPS)
    finally:
        pipe.transformer = model
    assert torch.isfinite(out).all()
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
