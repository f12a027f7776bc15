"""What branch-level SD3 / Flux schedules know and refuse: the units per block kind, 'not applicable' units,
per-unit FLOPs at the real token counts (counted vs arithmetic), the saved format, and the errors."""
from __future__ import annotations

import pytest

import l2c_kernels as l2c
from l2c_kernels.adapters.mmdit_branches import applicable, branch_names, estimate_branch_flops
from l2c_kernels.runtime.block_flops import measure_block_flops
from l2c_kernels.runtime.branch_wrappers import measure_branch_flops
from tests.families.conftest import TIMESTEPS, built
from tests.family_configs import FAMILIES


def test_units_per_block_kind():
    flux = built("flux-dev")        # 2 double + 2 single blocks
    assert branch_names(flux) == ["attn1", "ff", "ff_context"]
    assert applicable(flux) == [[True, True, True]] * 2 + [[True, True, False]] * 2
    sd3 = built("sd3-medium")       # the last block has context_pre_only: no text MLP
    assert applicable(sd3) == [[True, True, True], [True, True, False]]
    sd35m = built("sd3.5-medium")   # block 0 has SD3.5's dual attention
    assert branch_names(sd35m) == ["attn1", "attn2", "ff", "ff_context"]
    assert applicable(sd35m) == [[True, True, True, True], [True, False, True, False]]


def test_not_applicable_units_are_written_computed_and_default_stays_block_level():
    model = built("flux-dev")
    assert l2c.Schedule.full(model, TIMESTEPS).branches == ["block"]
    mask = [[[s == 0] * 3 for _ in range(4)] for s in range(len(TIMESTEPS))]   # reuse everything after step 0
    sched = l2c.Schedule.from_mask(model, TIMESTEPS, mask, branches=["attn1", "ff", "ff_context"])
    assert sched.plan[1] == ["RRR", "RRR", "RRC", "RRC"]
    assert sched.flops_removed_fraction() == pytest.approx(0.8)  # every unit removed at 4 of 5 steps
    # a subset of branches: the others are computed
    part = l2c.Schedule.from_mask(model, TIMESTEPS, [[[s == 0]] * 4 for s in range(5)], branches=["ff"])
    assert part.plan[1] == ["CRC"] * 4 and part.branches == ["attn1", "ff", "ff_context"]


def test_flops_removed_weighs_each_unit_by_its_block_cost():
    model = built("flux-dev")
    ubf = [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [10.0, 20.0, 0.0], [10.0, 20.0, 0.0]]  # 72 per step
    mask = [[[True] * 3] * 4] + [[[True, True, True], [True, True, True], [False, True, True], [True, True, True]]
                                 for _ in range(4)]
    sched = l2c.Schedule.from_mask(model, TIMESTEPS, mask, branches=["attn1", "ff", "ff_context"],
                                   unit_branch_flops=ubf)
    assert sched.flops_removed_fraction() == pytest.approx(4 * 10 / (5 * 72))


@pytest.mark.parametrize("name", ["flux-dev", "sd3.5-medium", "sd3-medium"])
def test_counted_unit_flops_equal_the_arithmetic_at_the_call_token_counts(name):
    fam, model = FAMILIES[name], built(name)
    batch = 2
    x = fam.latents(batch, 0)
    kw = fam.call_kwargs(x, 1000, fam.inputs(batch, 0))
    counted = measure_branch_flops(model, **kw)
    image_tokens = x.shape[1] if x.ndim == 3 else (x.shape[2] // 2) * (x.shape[3] // 2)  # Flux packed / SD3 patch 2
    text_tokens = kw["encoder_hidden_states"].shape[1]
    est = estimate_branch_flops(model, image_tokens=image_tokens, text_tokens=text_tokens)
    assert [[c / batch for c in row] for row in counted] == est
    assert all(v == 0 for row, app in zip(counted, applicable(model)) for v, ok in zip(row, app) if not ok)
    # units + the always-computed adaLN projections = the whole block, as counted at block level
    blocks = measure_block_flops(model, **kw)
    for ref, row, whole in zip(model.transformer_blocks if name.startswith("sd3") else
                               list(model.transformer_blocks) + list(model.single_transformer_blocks),
                               counted, blocks):
        norms = [m for n, m in ref.named_children() if n.startswith("norm1") or n == "norm"]
        if getattr(ref, "context_pre_only", False):
            norms = [ref.norm1]  # the text modulation of SD3's last block is part of attn1
        adaln = sum(2 * batch * m.linear.in_features * m.linear.out_features for m in norms)
        assert sum(row) + adaln == whole


def test_saved_schedule_keeps_unit_flops_and_runs_the_same():
    model = built("sd3.5-medium")
    names = branch_names(model)
    mask = [[[s % 2 == 0 or i % 2 == 0 for i in range(len(names))] for _ in range(2)] for s in range(5)]
    sched = l2c.Schedule.from_mask(model, TIMESTEPS, mask, branches=names, forecast="linear")
    back = l2c.Schedule.from_dict(__import__("json").loads(sched.to_json()))
    assert back == sched and back.unit_branch_flops == estimate_branch_flops(model)
    with pytest.raises(l2c.ScheduleError, match="unit_branch_flops"):
        l2c.Schedule.from_dict(dict(sched.to_dict(), unit_branch_flops=[[1.0, 2.0]] * 2))


def test_refusals():
    model = built("sd3.5-medium")
    names = branch_names(model)
    with pytest.raises(l2c.ScheduleError, match="ff_context"):
        l2c.Schedule.from_mask(built("flux-schnell"), TIMESTEPS, [[[True]] * 3] * 5, branches=["attn2"])
    tgate = l2c.Schedule.full(model, TIMESTEPS, branches=names)
    tgate.attn2_cache = "cfg_mean"
    with pytest.raises(l2c.ScheduleError, match="joint attention"):
        l2c.compile_schedule(model, tgate)
    with pytest.raises(l2c.ScheduleError, match=r"branches \['attn1', 'ff', 'ff_context'\] do not match"):
        l2c.compile_schedule(model, l2c.Schedule.full(built("sd3.5-large"), TIMESTEPS, branches=["attn1"]))
    with pytest.raises(l2c.ScheduleError, match="made for 4 blocks"):   # a Flux schedule on SD3
        l2c.compile_schedule(model, l2c.Schedule.full(built("flux-dev"), TIMESTEPS, branches=["attn1"]))
    # jumping to a step that reuses a unit no step of this generation computed
    mask = [[[s == 0] * len(names)] * 2 for s in range(5)]
    fast = l2c.compile_schedule(model, l2c.Schedule.from_mask(model, TIMESTEPS, mask, branches=names))
    fam = FAMILIES["sd3.5-medium"]
    fast.set_step(2)
    with pytest.raises(l2c.ScheduleError, match="reuses attn1 of block 0.*not filled"):
        fast(**fam.call_kwargs(fam.latents(1, 0), TIMESTEPS[2], fam.inputs(1, 0)))
