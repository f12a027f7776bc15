"""A schedule records the sampler it was made for; other timesteps map by step index only across a shift."""
from __future__ import annotations

import json

import pytest
import torch

from l2c_kernels.schedule import Schedule, ScheduleError, describe_sampler, sampler_info
from tests.tiny_models import tiny_dit
from tests.tiny_pipelines import flux_scheduler, sd3_scheduler, wan_scheduler

STEPS = 4


def flux_mu(image_seq_len: int) -> float:
    """diffusers' own shift rule for Flux (pipeline_flux.calculate_shift) with the published settings."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)


def flux_timesteps(image_seq_len: int, steps: int = STEPS):
    import numpy as np

    sch = flux_scheduler()
    mu = flux_mu(image_seq_len)
    sch.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return sch, mu


@pytest.fixture(scope="module")
def model():
    return tiny_dit(layers=2, sample_size=8)


def fora(model, timesteps, sampler):
    mask = [[[s % 2 == 0, True]] * 2 for s in range(len(timesteps))]
    return Schedule.from_mask(model, timesteps, mask, sampler=sampler, method="fora")


def test_sampler_info_records_class_shift_mu_and_round_trips(model, tmp_path):
    sch, mu = flux_timesteps(4096)
    info = sampler_info(sch, mu=mu)
    assert info["class"] == "FlowMatchEulerDiscreteScheduler" and info["shift"] == 3.0
    assert info["mu"] == pytest.approx(1.15) and info["config"]["use_dynamic_shifting"] is True
    s = fora(model, list(sch.timesteps), info)
    s.save(tmp_path / "s.json")
    back = Schedule.load(tmp_path / "s.json")
    assert back.sampler == info and back.plan == s.plan and back.timesteps == s.timesteps
    assert "FlowMatchEulerDiscreteScheduler (shift 3.0, mu 1.15)" == describe_sampler(info)


def test_files_without_a_sampler_still_load(model, tmp_path):
    sch = sd3_scheduler()
    sch.set_timesteps(STEPS)
    d = fora(model, list(sch.timesteps), sampler=None).to_dict()
    assert "sampler" not in d  # written only when known: files read by older versions stay the same
    (tmp_path / "old.json").write_text(json.dumps(d))
    assert Schedule.load(tmp_path / "old.json").sampler == {}


def test_flux_at_another_resolution_maps_by_step_index(model):
    small, mu_small = flux_timesteps(16)       # 64x64 image: 4x4 packed tokens
    large, mu_large = flux_timesteps(4096)     # 1024x1024
    ts_small, ts_large = [float(t) for t in small.timesteps], [float(t) for t in large.timesteps]
    assert ts_small[0] == ts_large[0] == 1000.0 and ts_small[1:] != ts_large[1:]   # the shift moves every later step
    s = fora(model, ts_large, sampler_info(large, mu=mu_large))
    with pytest.raises(ScheduleError, match=r"made for 4 steps of FlowMatchEulerDiscreteScheduler \(shift 3.0, mu 1.15\)"):
        s.step_index(ts_small[1])
    r = s.for_scheduler(small, mu=mu_small)
    assert r.plan == s.plan and r.num_steps == STEPS
    assert r.timesteps == pytest.approx(ts_small)
    assert r.sampler["mu"] == pytest.approx(mu_small, abs=1e-6)
    assert r.params["retimed_from"]["timesteps"] == s.timesteps
    assert [r.step_index(t) for t in ts_small] == list(range(STEPS))


def test_sd3_and_wan_shift_may_differ(model):
    a, b = sd3_scheduler(), wan_scheduler(flow_shift=5.0)
    a.set_timesteps(STEPS)
    b.set_timesteps(STEPS)
    s = fora(model, list(a.timesteps), sampler_info(a))
    r = s.for_scheduler(b)
    assert r.sampler["shift"] == 5.0 and r.plan == s.plan


def test_another_step_count_is_refused_naming_both(model):
    a, b = sd3_scheduler(), sd3_scheduler()
    a.set_timesteps(STEPS)
    b.set_timesteps(STEPS + 2)
    s = fora(model, list(a.timesteps), sampler_info(a))
    with pytest.raises(ScheduleError, match=r"made for 4 steps of FlowMatchEulerDiscreteScheduler \(shift 3.0\).*"
                                            r"has 6 steps"):
        s.for_scheduler(b)


def test_another_sampler_class_or_setting_is_refused_naming_both(model):
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    a = sd3_scheduler()
    a.set_timesteps(STEPS)
    s = fora(model, list(a.timesteps), sampler_info(a))
    ddim = DDIMScheduler()
    ddim.set_timesteps(STEPS)
    with pytest.raises(ScheduleError, match=r"made for FlowMatchEulerDiscreteScheduler \(shift 3.0\), and "
                                            r"DDIMScheduler differs in class"):
        s.for_scheduler(ddim)
    karras = FlowMatchEulerDiscreteScheduler(shift=3.0, invert_sigmas=True)
    karras.set_timesteps(STEPS)
    with pytest.raises(ScheduleError, match="differs in invert_sigmas"):
        s.for_scheduler(karras)


def test_unrecorded_sampler_checks_steps_only(model):
    a = sd3_scheduler()
    a.set_timesteps(STEPS)
    s = fora(model, list(a.timesteps), sampler=None)
    ddim_ts = [961, 721, 481, 241]
    r = s.retimed(ddim_ts)
    assert r.timesteps == ddim_ts and r.sampler == {}
    with pytest.raises(ScheduleError, match="made for 4 steps of an unrecorded sampler"):
        s.retimed(ddim_ts[:3])


def test_malformed_sampler_field_is_refused(model):
    d = fora(model, [3, 2, 1, 0], sampler=None).to_dict()
    d["sampler"] = {"shift": 3.0}
    with pytest.raises(ScheduleError, match='sampler must be empty or a JSON object with a "class"'):
        Schedule.from_dict(d)


def test_flow_timesteps_are_fractional_and_match_within_rounding(model):
    sch, mu = flux_timesteps(64)
    ts = [float(t) for t in sch.timesteps]
    assert any(not t.is_integer() for t in ts)
    s = fora(model, ts, sampler_info(sch, mu=mu))
    # what a pipeline passes: the timestep as a float32 tensor (Flux divides by 1000 and the model multiplies back)
    passed = [float(torch.tensor(t, dtype=torch.float32) / 1000 * 1000) for t in ts]
    assert [s.step_index(t) for t in passed] == list(range(STEPS))


def test_timesteps_rounded_to_bfloat16_find_their_step(model):
    sch, mu = flux_timesteps(16, steps=8)
    ts = [float(t) for t in sch.timesteps]
    s = fora_steps(model, ts)
    # a bf16 Flux pipeline passes (t in bf16) / 1000 in bf16; the model multiplies by 1000 again
    passed = [float((torch.tensor(t).to(torch.bfloat16) / 1000).float() * 1000) for t in ts]
    assert any(abs(p - t) > 1 for p, t in zip(passed, ts))           # off by whole timesteps ...
    assert [s.step_index(p) for p in passed] == list(range(8))       # ... and still the right steps


def test_low_precision_match_refuses_ambiguity_and_strangers(model):
    s = fora_steps(model, [981.3, 900.2])
    assert s.step_index(980) == 0                                     # bf16(981.3) = 980 (spacing 4 there)
    s = fora_steps(model, [981.3, 981.7])
    with pytest.raises(ScheduleError, match="timestep 980 is not in this schedule"):
        s.step_index(980)                                             # the bf16 image of both steps
    with pytest.raises(ScheduleError, match="timestep 500 is not in this schedule"):
        s.step_index(500)


def test_a_nearby_timestep_that_is_no_rounding_is_refused(model):
    sch, mu = flux_timesteps(16, steps=8)
    ts = [float(t) for t in sch.timesteps]
    s = fora_steps(model, ts)
    with pytest.raises(ScheduleError, match="is not in this schedule"):
        s.step_index(ts[2] * 1.001)    # 0.1% away, closer than bf16 rounding, but not what a pipeline passes


def fora_steps(model, ts):
    mask = [[[s % 2 == 0, True]] * 2 for s in range(len(ts))]
    return Schedule.from_mask(model, ts, mask)
