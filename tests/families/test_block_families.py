"""Every family in tests/family_configs.py at block level: all-compute equals the original model over a
whole generation, and a 50% block-reuse schedule (and forecasts) equals an independent hook reference."""
from __future__ import annotations

import pytest

import l2c_kernels as l2c
from tests.family_configs import FAMILIES
from tests.families.block_reference import HookBlockReference
from tests.families.conftest import TIMESTEPS, built, generate, max_err

NAMES = sorted(FAMILIES)


def half_reuse_mask(num_blocks, steps=len(TIMESTEPS)):
    """Step 0 computes every block; later steps reuse every other block, alternating (about 50% reused)."""
    return [[s == 0 or (s + b) % 2 == 0 for b in range(num_blocks)] for s in range(steps)]


@pytest.mark.parametrize("name", NAMES)
def test_all_compute_equals_original(name):
    fam, model = FAMILIES[name], built(name)
    sched = l2c.Schedule.full(model, TIMESTEPS, branches=["block"])
    fast = l2c.compile_schedule(model, sched)
    assert type(fast).__name__ == "BlockCachedTransformer"
    ref = generate(lambda s, kw: model(**kw), fam)
    got = generate(lambda s, kw: fast(**kw), fam)
    assert fast.current_step == len(TIMESTEPS) - 1  # the step was found from the timestep the pipeline passes
    assert max_err(ref, got) <= 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_half_block_reuse_matches_hook_reference(name):
    fam, model = FAMILIES[name], built(name)
    sched = l2c.Schedule.from_mask(model, TIMESTEPS, half_reuse_mask(l2c.Schedule.full(
        model, TIMESTEPS, branches=["block"]).num_blocks), branches=["block"])
    assert 0.3 <= sched.removed_fraction() <= 0.5
    fast = l2c.compile_schedule(model, sched)
    ref_model = HookBlockReference(model, fam, sched)
    ref = generate(ref_model.step, fam)
    got = generate(lambda s, kw: fast(**kw), fam)
    full = generate(lambda s, kw: model(**kw), fam)
    scale = max(float(o.abs().max()) for o in ref)
    # the residual ops round out - in and in + cached once each, as the reference does: equal up to the
    # float32 rounding of the later blocks' own arithmetic on identical inputs
    assert max_err(ref, got) <= 1e-5 * max(1.0, scale)
    assert max_err(full, got) > 1e-3  # the reuse really changed the output


@pytest.mark.parametrize("forecast", ["linear", "quadratic", "taylor"])
@pytest.mark.parametrize("name", ["flux-dev", "wan2.1-t2v"])
def test_forecast_matches_hook_reference(name, forecast):
    fam, model = FAMILIES[name], built(name)
    nb = l2c.Schedule.full(model, TIMESTEPS, branches=["block"]).num_blocks
    # reuse at 2 and 4; step 4 forecasts from steps 0, 1, 3 (uneven spacing: Taylor and Lagrange differ)
    mask = [[s in (0, 1, 3) or b == 0 for b in range(nb)] for s in range(len(TIMESTEPS))]
    sched = l2c.Schedule.from_mask(model, TIMESTEPS, mask, branches=["block"], forecast=forecast)
    fast = l2c.compile_schedule(model, sched)
    ref = generate(HookBlockReference(model, fam, sched).step, fam)
    got = generate(lambda s, kw: fast(**kw), fam)
    plain_fast = l2c.compile_schedule(model, l2c.Schedule.from_mask(model, TIMESTEPS, mask, branches=["block"]))
    plain = generate(lambda s, kw: plain_fast(**kw), fam)
    scale = max(float(o.abs().max()) for o in ref)
    # the fused op sums the weighted residuals in another order than the reference: a few float32 ulps
    assert max_err(ref, got) <= 1e-5 * max(1.0, scale)
    assert max_err(plain, got) > 1e-3
