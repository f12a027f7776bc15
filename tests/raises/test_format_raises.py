"""The schedule format's and the hand-made schedules' refusals, each triggered through the call a user makes
(Schedule.from_dict / from_mask / retimed / step_index, compile_schedule, schedules.*) and checked by its message."""
from __future__ import annotations

import pytest
import torch

import l2c_kernels as l2c
from l2c_kernels import schedules
from l2c_kernels.schedule import Schedule, ScheduleError
from tests.tiny_models import tiny_dit

TS = [981, 781, 581, 381, 181]
DIT = tiny_dit(layers=2)
FULL = Schedule.full(DIT, TS)


def changed(**fields) -> dict:
    """The tiny DiT's full schedule as a file's dict, with ``fields`` changed."""
    return dict(FULL.to_dict(), **fields)


@pytest.mark.parametrize("call,match", [
    pytest.param(lambda: Schedule.from_dict(changed(timesteps=[981, "781", 581, 381, 181])),
                 " is not a finite number", id="timestep-not-a-number"),
    pytest.param(lambda: FULL.retimed([torch.tensor([981.0, 781.0])] * 5), " must be one number, got ",
                 id="timestep-of-several-values"),
    pytest.param(lambda: Schedule.from_dict(changed(branches="attn1")), " must be a list, got ",
                 id="branches-not-a-list"),
    pytest.param(lambda: Schedule.from_dict(changed(method=3)), " must be a string, got ", id="method-not-a-string"),
    pytest.param(lambda: Schedule.from_dict(changed(branches=["block", "ff"])),
                 r"a block-level schedule has the one branch \['block'\]", id="block-among-branches"),
    pytest.param(lambda: Schedule.from_dict(changed(num_blocks=3)), "blocks; the schedule says ",
                 id="plan-rows-of-other-width"),
    pytest.param(lambda: Schedule.from_mask(DIT, TS, [[[True, True]] * 3] * 5), "mask step .* has .* blocks; ",
                 id="mask-of-other-width"),
    pytest.param(lambda: Schedule.full(DIT, TS, sampler={"class": "DDIMScheduler"}).retimed(
                     TS, sampler={"class": "DPMSolverMultistepScheduler"}),
                 "cannot map this schedule by step index: it was made for .*, and .* differs in ",
                 id="retimed-for-another-sampler"),
    pytest.param(lambda: l2c.compile_schedule(tiny_dit(layers=3), FULL), "schedule was made for .* blocks .* but ",
                 id="model-of-other-depth"),
    pytest.param(lambda: l2c.compile_schedule(DIT, Schedule.from_dict(changed(model_class="PixArtTransformer2DModel"))),
                 "schedule was made for .*, not ", id="model-of-other-class"),
])
def test_schedule_that_is_malformed_or_made_for_another_model_is_refused(call, match):
    with pytest.raises(ScheduleError, match=match):
        call()


@pytest.mark.parametrize("call,match", [
    pytest.param(lambda: schedules.uniform(DIT, TS, interval=0), "interval must be >= 1, got ", id="uniform"),
    pytest.param(lambda: schedules.deepcache(DIT, TS, keep_first=-1), r"keep_first \+ keep_last must be within 0\.\.",
                 id="deepcache"),
])
def test_baseline_schedule_with_impossible_settings_is_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()
