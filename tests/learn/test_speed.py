"""Speed targets: the budget for a speedup from the measured cost of a reused step, the timing arithmetic on a
clock the model's own work advances, and fronts learned at speed targets."""
from __future__ import annotations

import pytest

from l2c_kernels.learn import speed
from l2c_kernels.sampling.conditioning import denoiser_for
from tests.learn.test_step_search import KW, tiny_bundle


@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.2, 0.5])
@pytest.mark.parametrize("s", [1.25, 1.5, 2.0, 3.0])
def test_budget_and_predicted_speedup_are_inverse(ratio, s):
    """Per step a schedule removing b of the unit work costs ratio + (1 - ratio)(1 - b) of full compute: with no
    fixed part the budget is 1 - 1/s; the prediction inverts the budget to rounding (1e-12)."""
    b = speed.budget_for_speedup(s, ratio)
    if ratio == 0.0:
        assert b == pytest.approx(1 - 1 / s, abs=1e-12)
    if b < 1.0:
        assert speed.predicted_speedup(b, ratio) == pytest.approx(s, rel=1e-12)


def test_a_fixed_part_needs_more_removed():
    """reused 0.2, 2x: 1/2 = 0.2 + 0.8 (1 - b) -> b = 0.625 (against 0.5 with no fixed part); computed steps that
    cost 1.1 of a plain one: 1/2 = 0.2 + 0.9 (1 - b) -> b = 2/3."""
    assert speed.budget_for_speedup(2.0, 0.2) == pytest.approx(0.625, abs=1e-12)
    assert speed.budget_for_speedup(2.0, speed.StepCost(0.2, 1.1)) == pytest.approx(2 / 3, abs=1e-12)
    with pytest.raises(ValueError, match="a reused step costs less than a computed one"):
        speed.StepCost(1.2, 1.1)


def test_out_of_reach_targets_are_refused_naming_the_fastest():
    # 50 steps, ratio 0.2: two computed steps run 1 / (0.2 + 0.8 * 2/50) = 1 / 0.232 = 4.31x at most
    assert speed.budgets_for_speedups([1.5, 4.0], 0.2, 50) == pytest.approx(
        [1 - (1 / 1.5 - 0.2) / 0.8, 1 - (0.25 - 0.2) / 0.8])
    with pytest.raises(ValueError, match=r"a 5x speedup is out of reach at 50 steps .* at most 4.31x"):
        speed.budgets_for_speedups([2.0, 5.0], 0.2, 50)
    with pytest.raises(ValueError, match="a speedup target is a factor above 1"):
        speed.budget_for_speedup(1.0, 0.1)
    with pytest.raises(ValueError, match="a reused step costs less than a computed one"):
        speed.budget_for_speedup(2.0, 1.0)


def _work_clock():
    """``(clock, tick)``: a clock ``clock[0]`` that only forward hooks made by ``tick(cost)`` advance."""
    clock = [0.0]

    def tick(cost):
        def hook(*_):
            clock[0] += cost
        return hook
    return clock, tick


def test_step_costs_come_from_the_model_work():
    """A clock that only the model's work advances: 1 per attention or MLP branch computed, 0.5 per output layer
    call (every step). Two blocks: a plain step costs 4.5, a reused one 0.5 (1/9 of it), a computed one 4.5 (1):
    for every forecast, whatever the anchors' share of the timed runs."""
    bundle = tiny_bundle()
    model = bundle.transformer
    clock, tick = _work_clock()

    for blk in model.transformer_blocks:
        blk.attn1.register_forward_hook(tick(1.0))
        blk.ff.register_forward_hook(tick(1.0))
    model.proj_out_2.register_forward_hook(tick(0.5))
    den = denoiser_for(bundle, 2, 1.5, "ddim", seed=0)
    costs = speed.measure_step_costs(den, 8, rounds=1, clock=lambda: clock[0])
    assert set(costs) == set(speed.SPEED_FORECASTS) | {"pooled"}
    for c in costs.values():
        assert c.reused == pytest.approx(0.5 / 4.5, abs=1e-12) and c.computed == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="more than 5 steps"):
        speed.measure_step_costs(den, 5)


def test_a_front_at_speed_targets():
    """learn_front(speedups=...) learns at the budgets the targets need and records the target, the ratio and the
    speed its pick predicts (from the FLOPs it removes); budgets and speedups together are refused."""
    import l2c_kernels as l2c

    front = l2c.learn_front(bundle := tiny_bundle(), 7, speedups=[2.0, 1.5], step_cost=0.1, **KW)
    want = [speed.budget_for_speedup(s, 0.1) for s in (1.5, 2.0)]
    assert [s.params["budget"] for s in front] == pytest.approx(want)
    for s, target, b in zip(front, (1.5, 2.0), want):
        assert s.params["target_speedup"] == target and s.params["step_cost"] == dict(reused=0.1, computed=1.0)
        assert s.removed_fraction() >= b - 1e-6
        assert s.params["predicted_speedup"] == pytest.approx(
            speed.predicted_speedup(s.flops_removed_fraction(), 0.1), abs=1e-3)
    with pytest.raises(ValueError, match="budgets= or speedups=, not both"):
        l2c.learn_front(bundle, 7, budgets=[0.5], speedups=[2.0], step_cost=0.1)
    with pytest.raises(ValueError, match="out of reach at 7 steps"):
        l2c.learn_front(bundle, 7, speedups=[8.0], step_cost=0.1)


def test_a_negative_reused_step_is_clamped_without_moving_the_computed_one():
    """t = k c + (n - k) r with c = 1.1, r = -0.02 (noise) over 10 steps of 1 s: r reads 0, c stays 1.1."""
    n, ks, c = 10, (3, 6, 10), 1.1
    cost = speed.solve_step_cost([k * c + (n - k) * -0.02 for k in ks], ks, n, 1.0)
    assert cost.reused == 0.0 and cost.computed == pytest.approx(c, abs=1e-12)
    clean = speed.solve_step_cost([k * c + (n - k) * 0.07 for k in ks[:2]], ks[:2], n, 1.0)   # exact on two runs
    assert clean.reused == pytest.approx(0.07, abs=1e-12) and clean.computed == pytest.approx(c, abs=1e-12)
    with pytest.raises(ValueError, match="at least two computed-step counts"):
        speed.solve_step_cost([1.0, 1.1], (3, 3), n, 1.0)


def test_step_costs_are_the_least_squares_line_through_three_runs():
    """Three timed runs off the line by +e, -2e, +e (a zero-sum pattern orthogonal to the k's spread when the k's are
    evenly spaced): the fit returns the line itself; a shifted third run moves the slope by its least-squares share."""
    n, ks, c, r, e = 12, (2, 7, 12), 1.05, 0.05, 0.3
    line = [k * c + (n - k) * r for k in ks]
    cost = speed.solve_step_cost([line[0] + e, line[1] - 2 * e, line[2] + e], ks, n, 1.0)
    assert cost.computed == pytest.approx(c, abs=1e-12) and cost.reused == pytest.approx(r, abs=1e-12)
    moved = speed.solve_step_cost([line[0], line[1], line[2] + e], ks, n, 1.0)
    # slope of t on k moves by e (k3 - mean k) / sum (k - mean k)^2 = e * 5 / 50; c - r moves by that, r by
    # -(mean k) / n of it plus e / 3n
    d = e * 5 / 50
    assert moved.computed - moved.reused == pytest.approx(c - r + d, abs=1e-12)
    assert moved.reused == pytest.approx(r + (e / 3 - 7 * d) / n, abs=1e-12)


def test_step_costs_on_a_flux_pipeline_come_from_the_model_work():
    """The same on the two-stream Flux pipeline (block-level runtime, packed latents, flow matching): a clock that only
    the model's work advances, 1 per transformer block run (double or single stream) and 0.5 per output projection
    (every call). 1 double + 2 single blocks: a plain step costs 3.5, a reused one 0.5 (1/7), a computed one 3.5 (1),
    for every forecast and pooled, fitted on all three timed kinds of generation."""
    from tests.tiny_pipelines import CALL_KW, PROMPTS, tiny_flux_pipeline

    pipe = tiny_flux_pipeline(seed=0, layers=1, single_layers=2)
    model = pipe.transformer
    clock, tick = _work_clock()

    for blk in list(model.transformer_blocks) + list(model.single_transformer_blocks):
        blk.register_forward_hook(tick(1.0))
    model.proj_out.register_forward_hook(tick(0.5))
    kw = CALL_KW["flux"]
    den = denoiser_for(pipe, prompts=PROMPTS, cfg=kw["guidance_scale"], height=kw["height"], width=kw["width"],
                       max_sequence_length=kw["max_sequence_length"])
    costs = speed.measure_step_costs(den, 8, rounds=1, clock=lambda: clock[0])
    assert set(costs) == set(speed.SPEED_FORECASTS) | {"pooled"}
    for c in costs.values():
        assert c.reused == pytest.approx(0.5 / 3.5, abs=1e-12) and c.computed == pytest.approx(1.0, abs=1e-12)
