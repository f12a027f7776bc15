"""SD3 / SD3.5 / Flux.1 at branch level (units attn1, attn2, ff, ff_context) on published configs with 2 layers
of each kind: all-compute equals the original model over a whole generation; random, 50% and forecast
schedules (and whole-block reuse mixed in) equal an independent forward-hook reference of the same schedule."""
from __future__ import annotations

import random

import pytest

import l2c_kernels as l2c
from l2c_kernels.adapters.mmdit_branches import applicable, branch_names
from tests.families.conftest import TIMESTEPS, built, generate, max_err
from tests.family_configs import FAMILIES
from tests.mmdit_branches.hook_reference import HookBranchReference

NAMES = ["flux-dev", "flux-schnell", "sd3-medium", "sd3.5-large", "sd3.5-medium"]


def random_mask(model, seed, p_compute=0.5, steps=len(TIMESTEPS)):
    """Step 0 computes everything; later units compute with probability ``p_compute``."""
    rng = random.Random(seed)
    nb, nbr = len(applicable(model)), len(branch_names(model))
    return [[[s == 0 or rng.random() < p_compute for _ in range(nbr)] for _ in range(nb)] for s in range(steps)]


def run_both(model, fam, sched):
    fast = l2c.compile_schedule(model, sched)
    got = generate(lambda s, kw: fast(**kw), fam)
    ref = generate(HookBranchReference(model, sched).step, fam)
    return got, ref


def scale_of(outs):
    return max(1.0, max(float(o.abs().max()) for o in outs))


@pytest.mark.parametrize("name", NAMES)
def test_all_compute_equals_original(name):
    fam, model = FAMILIES[name], built(name)
    sched = l2c.Schedule.full(model, TIMESTEPS, branches=branch_names(model))
    fast = l2c.compile_schedule(model, sched)
    assert type(fast).__name__ == "BranchCachedTransformer"
    ref = generate(lambda s, kw: model(**kw), fam)
    got = generate(lambda s, kw: fast(**kw), fam)
    assert fast.current_step == len(TIMESTEPS) - 1
    assert max_err(ref, got) <= 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_random_branch_schedule_matches_hook_reference(name):
    fam, model = FAMILIES[name], built(name)
    sched = l2c.Schedule.from_mask(model, TIMESTEPS, random_mask(model, seed=len(name)), branches=branch_names(model))
    assert 0.1 < sched.flops_removed_fraction() < 0.9  # a real mix (the fraction depends on the draw)
    got, ref = run_both(model, fam, sched)
    full = generate(lambda s, kw: model(**kw), fam)
    # the fused ops add gate * output in one rounding where the model multiplies then adds, and a split
    # proj_out sums two products: a few float32 ulps per step on identical inputs
    assert max_err(ref, got) <= 1e-5 * scale_of(ref)
    assert max_err(full, got) > 1e-3  # the reuse really changed the output


@pytest.mark.parametrize("name", ["flux-dev", "sd3.5-medium"])
@pytest.mark.parametrize("branch", ["attn1", "ff", "ff_context", "attn2"])
def test_half_of_one_branch_kind_matches_hook_reference(name, branch):
    """50% of one unit kind reused (every other step after the first), the rest computed."""
    fam, model = FAMILIES[name], built(name)
    names = branch_names(model)
    if branch not in names:
        pytest.skip(f"{name} has no {branch}")
    nb = len(applicable(model))
    mask = [[[s % 2 == 0 or br != branch for br in names] for _ in range(nb)] for s in range(len(TIMESTEPS))]
    sched = l2c.Schedule.from_mask(model, TIMESTEPS, mask, branches=names)
    got, ref = run_both(model, fam, sched)
    assert max_err(ref, got) <= 1e-5 * scale_of(ref)
    assert max_err(generate(lambda s, kw: model(**kw), fam), got) > 1e-4


@pytest.mark.parametrize("forecast", ["linear", "quadratic"])
@pytest.mark.parametrize("name", ["flux-dev", "sd3.5-medium"])
def test_forecast_matches_hook_reference(name, forecast):
    fam, model = FAMILIES[name], built(name)
    names = branch_names(model)
    nb = len(applicable(model))
    # steps 2 and 4 reuse every unit of every other block (forecast from 2 then 3 computations)
    mask = [[[s in (0, 1, 3) or (b + i) % 2 == 0 for i in range(len(names))] for b in range(nb)]
            for s in range(len(TIMESTEPS))]
    sched = l2c.Schedule.from_mask(model, TIMESTEPS, mask, branches=names, forecast=forecast)
    got, ref = run_both(model, fam, sched)
    plain_fast = l2c.compile_schedule(model, l2c.Schedule.from_mask(model, TIMESTEPS, mask, branches=names))
    plain = generate(lambda s, kw: plain_fast(**kw), fam)
    # the fused forecast sums the weighted outputs in another order than the reference: a few ulps
    assert max_err(ref, got) <= 1e-5 * scale_of(ref)
    assert max_err(plain, got) > 1e-3


@pytest.mark.parametrize("name", ["flux-dev", "sd3-medium"])
def test_whole_block_reuse_mixed_with_branches_matches_hook_reference(name):
    fam, model = FAMILIES[name], built(name)
    names = branch_names(model)
    nb = len(applicable(model))
    mask = random_mask(model, seed=3, p_compute=0.6)
    block_reuse = [[s > 0 and (s + b) % 3 == 0 for b in range(nb)] for s in range(len(TIMESTEPS))]
    sched = l2c.Schedule.from_mask(model, TIMESTEPS, mask, branches=names, block_reuse=block_reuse)
    assert any(e == "B" for row in sched.plan for e in row)
    got, ref = run_both(model, fam, sched)
    assert max_err(ref, got) <= 1e-5 * scale_of(ref)
