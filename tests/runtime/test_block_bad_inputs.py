"""Bad latents on the block-level and two-stream branch-level runtimes, on the published configs (a few layers,
random weights): NaN / infinite latents and a dtype other than the weights' are refused with a message naming the
problem, before any block runs and before the step is counted."""
from __future__ import annotations

import pytest
import torch

import l2c_kernels as l2c
from l2c_kernels.adapters.mmdit_branches import branch_names
from tests.family_configs import FAMILIES

CASES = ["flux-dev", "sd3-medium", "wan2.1-t2v"]


def _compiled(name, branch_level=False):
    fam = FAMILIES[name]
    model = fam.build()
    ts = [900.0, 600.0, 300.0]
    units = branch_names(model) if branch_level else ["block"]
    nb = l2c.adapters.adapter_for(model, ["block"]).num_blocks(model)
    mask = torch.ones(len(ts), nb, len(units), dtype=torch.bool)
    mask[1:, 1:] = False
    sched = l2c.Schedule.from_mask(model, ts, mask, branches=None if not branch_level else units)
    return fam, l2c.compile_schedule(model, sched)


def _call(fam, fast, x):
    return fast(**fam.call_kwargs(x, 900.0, fam.inputs(x.shape[0], 0)))


@pytest.mark.parametrize("name,branch_level", [(n, False) for n in CASES] + [("flux-dev", True), ("sd3-medium", True)])
@pytest.mark.parametrize("bad,match", [("nan", "hidden_states contain NaN"), ("inf", "contain infinite values"),
                                       ("float64", "hidden_states are float64 but the model's weights are float32")])
def test_block_and_branch_runtimes_refuse_bad_latents_before_any_block_runs(name, branch_level, bad, match):
    fam, fast = _compiled(name, branch_level)
    x = fam.latents(2, 0)
    if bad == "nan":
        x = x.clone()
        x.view(-1)[3] = float("nan")
    elif bad == "inf":
        x = x.clone()
        x.view(-1)[5] = float("inf")
    else:
        x = x.double()
    with pytest.raises(ValueError, match=match):
        _call(fam, fast, x)
    assert fast.current_step is None
    _call(fam, fast, fam.latents(2, 0))   # the module still runs the schedule from step 0
    assert fast.current_step == 0
