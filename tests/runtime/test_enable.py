"""l2c.enable / l2c.summary / l2c.disable on unmodified DiT and PixArt pipelines built from tiny configs."""
from __future__ import annotations

import pytest
import torch

import l2c_kernels as l2c
from l2c_kernels import schedules
from l2c_kernels.models.pipelines import PipelineTextEncoder, PipelineTokenizer
from l2c_kernels.models.text_encoder import DigitTextEncoder
from l2c_kernels.runtime import resample_schedule
from tests.runtime.hook_reference import HookReference
from tests.runtime.test_pipelines import timesteps_of, tiny_vae
from tests.tiny_models import StandIn, rel_err, tiny_dit, tiny_pixart

STEPS = 4


class HookedTransformer(StandIn):
    """What ``l2c.enable`` puts in a pipeline, done by the hook-based reference: call k runs step k mod n."""

    def __init__(self, model, schedule):
        super().__init__()
        self.model, self.ref, self.calls = model, HookReference(model, schedule), 0

    def forward(self, hidden_states, timestep=None, class_labels=None, return_dict=True):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        out = self.ref.step(self.calls % self.ref.schedule.num_steps,
                            dict(hidden_states=hidden_states, timestep=timestep, class_labels=class_labels))
        self.calls += 1
        return Transformer2DModelOutput(sample=out)


def dit_pipe():
    from diffusers import DDIMScheduler, DiTPipeline

    model = tiny_dit(layers=3, sample_size=8)
    return DiTPipeline(transformer=model, vae=tiny_vae(), scheduler=DDIMScheduler()), model


def run_dit(pipe, steps=STEPS):
    return torch.tensor(pipe(class_labels=[1, 2], num_inference_steps=steps, guidance_scale=3.0,
                             generator=torch.Generator().manual_seed(0), output_type="np").images)


def test_dit_enable_summary_disable():
    pipe, model = dit_pipe()
    ref = run_dit(pipe)
    ts = timesteps_of(pipe.scheduler, STEPS)
    sched = schedules.uniform(model, ts, 2)
    fast = l2c.enable(pipe, sched, timestep_check="off")  # the call counter alone: what a GPU run does
    assert pipe.transformer is fast and fast.original_model is model
    first, second = run_dit(pipe), run_dit(pipe)
    assert torch.equal(first, second) and rel_err(first, ref) > 0
    s = l2c.summary(pipe)
    assert s["steps_run"] == 2 * STEPS and s["generations"] == 2 and s["plans_used"] == 2
    assert s["branch_flops_removed"] == pytest.approx(sched.flops_removed_fraction(), abs=1e-3)
    fast(**dict(hidden_states=torch.randn(4, 4, 8, 8), timestep=torch.tensor([7] * 4),
                class_labels=torch.tensor([1, 2, 1000, 1000])))  # a stray call: the next generation still restarts
    assert torch.equal(run_dit(pipe), first)
    # the full schedule through enable gives the original images
    l2c.enable(pipe, l2c.Schedule.full(model, ts))
    assert rel_err(run_dit(pipe), ref) < 1e-4
    back = l2c.disable(pipe)
    assert back is model and pipe.transformer is model
    assert "set_timesteps" not in vars(pipe.scheduler)
    assert torch.equal(run_dit(pipe), ref)
    with pytest.raises(ValueError, match="not enabled"):
        l2c.disable(pipe)
    # the same pipeline with the hook-based reference of the schedule in its place gives the images enable gave:
    # decoded from float32 latents that agree to float32 rounding (the runtime's tests against it: 1e-5)
    hooked = HookedTransformer(model, sched)
    pipe.transformer = hooked
    assert rel_err(first, run_dit(pipe)) < 1e-5 and hooked.calls == STEPS


def test_other_step_count_raises_unless_resampled():
    pipe, model = dit_pipe()
    sched = schedules.uniform(model, timesteps_of(pipe.scheduler, STEPS), 2)
    l2c.enable(pipe, sched)
    with pytest.raises(l2c.ScheduleError, match="made for 4 steps.*resample=True"):
        run_dit(pipe, steps=6)
    l2c.enable(pipe, sched, resample=True)
    out = run_dit(pipe, steps=6)
    s = l2c.summary(pipe)
    assert s["schedule_steps"] == 6 and s["resampled_from_steps"] == 4 and s["generations"] == 1
    assert pipe.transformer.schedule.timesteps == timesteps_of(pipe.scheduler, 6)
    assert out.shape == run_dit(pipe, steps=STEPS).shape  # back to 4 steps: the original schedule's module
    assert l2c.summary(pipe)["resampled_from_steps"] is None
    l2c.disable(pipe)
    assert pipe.transformer is model


def test_resample_maps_normalised_time():
    ts = [981, 801, 601, 401, 201, 1]
    plan = [["CC", "CC"], ["RC", "CR"], ["CC", "B"], ["RR", "CC"], ["CC", "RR"], ["RC", "CC"]]
    sched = l2c.Schedule(timesteps=ts, plan=plan, branches=["attn1", "ff"], num_blocks=2, forecast="linear")
    three = resample_schedule(sched, [900, 500, 100])
    assert three.plan == [plan[0], plan[2], plan[5]] and three.timesteps == [900, 500, 100]
    eleven = resample_schedule(sched, list(range(1000, -1, -100)))
    assert eleven.plan[0] == plan[0] and eleven.plan[-1] == plan[-1] and eleven.forecast == "linear"
    assert eleven.params["resampled_from_steps"] == 6


def test_pixart_enable_collapses_cfg_and_disable_restores():
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    model = tiny_pixart(layers=2, sample_size=8)
    torch.manual_seed(0)
    enc = DigitTextEncoder(dim=12, num_layers=1, num_heads=2).eval()
    pipe = PixArtAlphaPipeline(tokenizer=PipelineTokenizer(enc.tokenizer), text_encoder=PipelineTextEncoder(enc),
                               vae=tiny_vae(), transformer=model, scheduler=DPMSolverMultistepScheduler())

    def run():
        return torch.tensor(pipe(["the digit seven", "a 3"], num_inference_steps=STEPS, guidance_scale=4.0,
                                 use_resolution_binning=False, max_sequence_length=8, height=16, width=16,
                                 generator=torch.Generator().manual_seed(0), output_type="np").images)

    ref = run()
    sched = schedules.tgate(model, timesteps_of(pipe.scheduler, STEPS), gate_step=2, sp_interval=1, fi_interval=1)
    l2c.enable(pipe, sched, cfg_collapse=False)
    off = run()
    fast = l2c.enable(pipe, sched)  # PixArt pipelines batch CFG halves identically: collapse assumed
    assert fast.cfg_collapse == "assume"
    on = run()
    assert rel_err(on, off) < 1e-5 and rel_err(on, ref) > 0
    s = l2c.summary(pipe)
    assert s["collapsed_calls"] == STEPS - 2 and s["enabled_on"] == "PixArtAlphaPipeline"
    l2c.disable(pipe)
    assert pipe.transformer is model and torch.equal(run(), ref)
