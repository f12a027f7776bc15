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


def _ticking_bundle():
    """The tiny DiT with a clock only its work advances (as in test_step_costs_come_from_the_model_work): a plain
    step costs 4.5, a reused one 0.5."""
    bundle = tiny_bundle()
    model = bundle.transformer
    clock, tick = _work_clock()
    for blk in model.transformer_blocks:
        blk.attn1.register_forward_hook(tick(1.0))
        blk.ff.register_forward_hook(tick(1.0))
    model.proj_out_2.register_forward_hook(tick(0.5))
    return bundle, clock


def test_step_costs_come_from_the_model_work():
    """A clock that only the model's work advances: 1 per attention or MLP branch computed, 0.5 per output layer
    call (every step). Two blocks: a plain step costs 4.5, a reused one 0.5 (1/9 of it), a computed one 4.5 (1):
    for every forecast, whatever the anchors' share of the timed runs."""
    bundle, clock = _ticking_bundle()
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


# ------------------------------------------------------------------------------------ checking a front's speeds
def test_refit_averages_the_computed_step_with_the_learned_schedules_timings():
    """reused 0.1, computed 1.0 placed the budgets; schedules that really run with a computed step of 1.2 (span 1.1
    against the placed 0.9): the refit span is the mean of the two, 1.0, so computed 1.1; reused is kept."""
    placed = speed.StepCost(0.1, 1.0)
    timed = [(b, 1.0 / (0.1 + (1.0 - b) * 1.1)) for b in (0.3, 0.5, 0.7)]
    refit = speed.refit_step_cost(placed, timed)
    assert refit.reused == 0.1 and refit.computed == pytest.approx(1.1, abs=1e-12)
    # timings that agree with the placed cost leave it as it was
    same = speed.refit_step_cost(placed, [(b, speed.predicted_speedup(b, placed)) for b in (0.3, 0.6)])
    assert same.computed == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="refitting the step cost needs at least one schedule that removes less"):
        speed.refit_step_cost(placed, [(1.0, 5.0)])


def test_measured_speedups_come_from_the_model_work():
    """Computing k of n = 8 steps on the work clock takes k 4.5 + (n - k) 0.5 against n 4.5 for full compute."""
    from l2c_kernels.schedules import computed_steps

    bundle, clock = _ticking_bundle()
    den = denoiser_for(bundle, 2, 1.5, "ddim", seed=0)
    ts = den.timesteps(8)
    sets = [(0, 1, 2, 4, 6), (0, 3)]
    scheds = [computed_steps(bundle.transformer, ts, st) for st in sets]
    got = speed.measure_speedups(den, 8, scheds, rounds=1, clock=lambda: clock[0])
    assert got == pytest.approx([8 * 4.5 / (len(st) * 4.5 + (8 - len(st)) * 0.5) for st in sets], abs=1e-12)
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        speed.measure_speedups(den, 8, scheds, rounds=0)


def test_a_front_whose_speeds_check_out_is_kept(monkeypatch):
    """Step costs timed here on the work clock are exact, so the check measures what each schedule's FLOPs predict
    and learns nothing again; every schedule records its measured speedup."""
    import l2c_kernels as l2c
    from l2c_kernels import timing

    bundle, clock = _ticking_bundle()
    monkeypatch.setattr(timing, "device_clock", lambda device: (lambda: clock[0]))
    front = l2c.learn_front(bundle, 7, speedups=[1.5, 2.0], speed_check=1, **KW)
    for s in front:
        assert "placed_again_from_budget" not in s.params
        assert s.params["step_cost"]["reused"] == pytest.approx(0.5 / 4.5, abs=1e-4)
        assert s.params["measured_speedup"] == pytest.approx(s.params["predicted_speedup"], abs=2e-3)


def test_a_front_that_runs_slow_is_placed_again(monkeypatch):
    """Timings at 70% of the prediction: the check's computed step disagrees with the calibration's by far more than
    a run's noise, so the front is timed a second time and the median of the three estimates (here the timings')
    taken; every target whose budget that moves by a step of 7 or more is learned again at the moved budget and
    timed again (the first timing kept); the others stay as learned."""
    import l2c_kernels as l2c
    from l2c_kernels import timing

    bundle, clock = _ticking_bundle()
    monkeypatch.setattr(timing, "device_clock", lambda device: (lambda: clock[0]))
    calls = []

    def slow(den, steps, schedules, rounds=5, **kw):
        out = [0.7 * speed.predicted_speedup(s.flops_removed_fraction(), speed.StepCost(**s.params["step_cost"]))
               for s in schedules]
        calls.append([(s.params["budget"], s.flops_removed_fraction(), m) for s, m in zip(schedules, out)])
        return out

    monkeypatch.setattr(speed, "measure_speedups", slow)
    targets = (1.25, 1.5)
    front = l2c.learn_front(bundle, 7, speedups=list(targets), speed_check=1, **KW)
    placed = speed.StepCost(0.5 / 4.5, 1.0)
    first = [speed.budget_for_speedup(t, placed) for t in targets]
    assert [b for b, _, _ in calls[0]] == pytest.approx(first, abs=1e-4) and calls[1] == calls[0]   # timed twice
    span = speed.fitted_span(placed, [(r, m) for _, r, m in calls[0]])
    assert abs(span / (placed.computed - placed.reused) - 1) > speed.AGREEMENT
    refit = speed.StepCost(placed.reused, placed.reused + span)   # the median of (calibration, span, span)
    moved = speed.budgets_for_speedups(targets, refit, 7)
    redo = [k for k in range(2) if abs(moved[k] - first[k]) >= 1 / 7]
    # what changed (learned again, or a smaller budget that took a larger one's schedule) was timed again
    changed = [k for k, s in enumerate(front) if "first_measured_speedup" in s.params]
    assert redo and set(redo) <= set(changed) and len(calls) == 3 and len(calls[2]) == len(changed)
    for k, s in enumerate(front):
        assert s.params["target_speedup"] == targets[k]
        assert s.params["step_cost"]["computed"] == pytest.approx(refit.computed, abs=1e-4) or k not in changed
        if k in redo:
            assert s.params["placed_again_from_budget"] == pytest.approx(first[k], abs=1e-4)
            assert s.params["budget"] == pytest.approx(moved[k], abs=1e-4)
        else:
            assert "placed_again_from_budget" not in s.params
        if k in changed:
            assert s.params["first_measured_speedup"] == pytest.approx(calls[0][k][2], abs=1e-3)
            assert s.params["measured_speedup"] == pytest.approx(calls[2][changed.index(k)][2], abs=1e-3)
        else:
            assert s.params["measured_speedup"] == pytest.approx(calls[0][k][2], abs=1e-3)


def test_timings_that_agree_with_the_calibration_are_averaged_with_it(monkeypatch):
    """Timings 5% under the prediction (inside AGREEMENT): the front is timed once and the computed step refit as the
    mean of the two estimates."""
    placed = speed.StepCost(0.1, 1.0)
    front = [l2c_schedule(b) for b in (0.3, 0.6)]
    calls = []

    def timed(den, steps, schedules, rounds=5, **kw):
        calls.append(len(schedules))
        return [0.95 * speed.predicted_speedup(s.flops_removed_fraction(), placed) for s in schedules]

    monkeypatch.setattr(speed, "measure_speedups", timed)
    chk = speed.check_front(front, [0.3, 0.6], [1.4, 2.0], placed, None, 10)
    span = speed.fitted_span(placed, [(s.flops_removed_fraction(), m) for s, m in zip(front, chk["measured"])])
    assert calls == [2] and chk["measured_again"] is None
    assert abs(span / 0.9 - 1) < speed.AGREEMENT
    assert chk["refit"].computed == pytest.approx(0.1 + 0.5 * (span + 0.9), abs=1e-12)


def l2c_schedule(removed: float):
    """A 10-step schedule of one block and branch that reuses the first ``removed`` of its steps after step 0."""
    from l2c_kernels.schedule import Schedule

    k = round(10 * removed)
    return Schedule(timesteps=list(range(900, -1, -100)), branches=["attn1"], num_blocks=1,
                    plan=[["C"]] + [["R"] if s <= k else ["C"] for s in range(1, 10)])


def test_speed_check_refuses_what_is_not_a_count_of_rounds():
    import l2c_kernels as l2c

    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match=r"speed_check is a number of timed rounds \(0: no check\), got ") as e:
            l2c.learn_front(tiny_bundle(), 7, speedups=[2.0], speed_check=bad, **KW)
        assert str(e.value).endswith(repr(bad))
