"""The global step-level search: exact DP against brute force, segment costs against real rollouts, the partial
sampling loop against the whole one, fronts that are monotone, and the pick never below the step-level optimum."""
from __future__ import annotations

import copy
import itertools
import math
import random

import pytest
import torch

from l2c_kernels.learn import step_search as ss
from l2c_kernels.learn.candidates import _Calibration, _mask_key
from l2c_kernels.sampling.conditioning import denoiser_for
from l2c_kernels.learn.units import learning_units
from l2c_kernels.models import BundledModel
from l2c_kernels.models.configs import NOISE_SCHEDULE
from l2c_kernels.schedule import FORECASTS
from tests.tiny_models import tiny_dit

CFG = 1.5


def tiny_bundle():
    return BundledModel("dit-digits", tiny_dit(layers=2), None, dict(NOISE_SCHEDULE), info=dict(recommended_cfg=CFG))


# ------------------------------------------------------------------------------------------- the DP, exactly
def _brute(n, cost, counts, max_interval, warm_up=0, combine="sum"):
    """Every set of computed steps (0 and the warm-up included), scored by walking its segments."""
    out = {m: [] for m in counts}
    for m in counts:
        for rest in itertools.combinations(range(1, n), m - 1):
            steps = (0,) + rest
            if any(s not in steps for s in range(warm_up)):
                continue
            path = list(steps) + [n]
            segs = []
            ok = True
            for k in range(len(path) - 1):
                p = path[k - 1] if k > 0 else -1
                i, j = path[k], path[k + 1]
                if j - i > max_interval:
                    ok = False
                    break
                segs.append(cost(p, i, j))
            if ok:
                key = (max(segs), sum(segs)) if combine == "max" else (sum(segs), sum(segs))
                out[m].append((key, steps))
    return {m: sorted(v) for m, v in out.items()}


@pytest.mark.parametrize("combine,warm_up", [("sum", 0), ("sum", 3), ("max", 0), ("max", 2)])
def test_best_step_sets_is_the_brute_force_optimum(combine, warm_up):
    """Random path-aware costs on 9 steps: the DP's top-3 sets per count are the 3 best of every set there is
    (distinct costs: random floats), segments longer than max_interval excluded."""
    n, mi = 9, 3
    rng = random.Random(7 + warm_up)
    table = {}

    def cost(p, i, j):
        if (p, i, j) not in table:
            table[(p, i, j)] = 0.0 if j == i + 1 else rng.random()
        return table[(p, i, j)]

    counts = range(max(3, warm_up), 7)
    got = ss.best_step_sets(n, cost, counts, max_interval=mi, warm_up=warm_up, top=3, combine=combine)
    want = _brute(n, cost, counts, mi, warm_up, combine)
    for m in counts:
        assert [s.steps for s in got[m]] == [st for _, st in want[m][:3]]
        assert [s.cost for s in got[m]] == pytest.approx([k[0] for k, _ in want[m][:3]], abs=1e-12)


def test_best_step_sets_refuses_counts_it_cannot_hold():
    with pytest.raises(ValueError, match="counts must lie in"):
        ss.best_step_sets(5, lambda p, i, j: 0.0, [6], max_interval=2)
    with pytest.raises(ValueError, match="combine must be"):
        ss.best_step_sets(5, lambda p, i, j: 0.0, [3], max_interval=2, combine="mean")


def test_computed_count_removes_at_least_the_budget():
    for n in (7, 20, 28, 50):
        for b in (0.35, 0.5, 0.67, 0.75):
            m = ss.computed_count(n, b)
            assert (n - m) / n >= b - 1e-12 and (n - m - 1) / n < b   # the most steps that still meet it


# -------------------------------------------------------------------------- the partial loop is the loop
@pytest.mark.parametrize("scheduler", ["ddim", "dpm++"])
def test_a_run_started_from_a_recorded_state_ends_where_the_whole_run_ends(scheduler):
    """``Denoiser.run(start=k, scheduler=states[k])`` from the recorded latents continues the same arithmetic: the
    final latents equal the whole run's exactly (a multistep sampler's history travels in the state)."""
    den = denoiser_for(tiny_bundle(), 2, CFG, scheduler, seed=3)
    n = 6
    x = den.noise(4)
    inputs, states = den.scheduler_states(n, x)
    with torch.no_grad():
        whole = den.run(den.transformer, n, x, raw=True).sample
        for k in (1, 3, 5):
            part = den.run(den.transformer, n, inputs[k], start=k, scheduler=copy.deepcopy(states[k]), raw=True)
            assert torch.equal(part.sample, whole)
            assert torch.equal(inputs[k + 1], den.run(den.transformer, n, inputs[k], start=k, stop=k + 1,
                                                       scheduler=copy.deepcopy(states[k]), raw=True).sample)
    assert torch.equal(inputs[n], whole)
    with pytest.raises(ValueError, match="needs the scheduler's state"):
        den.run(den.transformer, n, x, start=2)
    with pytest.raises(ValueError, match="start and stop"):
        den.run(den.transformer, n, x, start=4, stop=4, scheduler=states[4])


# ------------------------------------------------------------------------ segment costs are real rollouts
def _calibration(n=7, samples=2):
    den = denoiser_for(tiny_bundle(), samples, CFG, None, seed=11)
    ts = den.timesteps(n)
    den._timesteps = ts
    x = den.noise(5)
    model = den.transformer
    units = learning_units(den, None)
    ref, _ = den.sample_with(model, n, x)
    return _Calibration(den, x, ref, model, ts, FORECASTS, None, units.schedule_kwargs,
                        (units.num_blocks, len(units.names)))


def test_a_segment_cost_is_the_error_of_the_schedule_that_reuses_only_that_segment():
    """A schedule computing every step but ``i + 1 .. j - 1`` follows full compute up to step ``i``, so the error of
    the latents entering ``j`` in its real rollout is the teacher-forced segment cost (linear: anchors ``i - 1, i``;
    Taylor: ``i - 2, i - 1, i``, the third the one the measurement assumes; plain reuse: ``i``). Bound: both rollouts run the same runtime from latents that differ by what the runtime's
    computed steps differ from the plain model's, ``delta`` (measured here); the squared error then differs by at
    most ``2 rms(d) rms(delta) + rms(delta)^2`` per sample (``d`` the segment's error), with a factor 10 for the
    reused steps' propagation of ``delta``."""
    from l2c_kernels.runtime import compile_schedule
    from l2c_kernels.schedule import Schedule

    calib = _calibration()
    n = len(calib.timesteps)
    costs = ss.measure_segment_costs(calib, 4)
    inputs, _ = calib.den.scheduler_states(n, calib.noise)
    nb, nu = calib.units_shape
    full = compile_schedule(calib.model, Schedule.from_mask(calib.model, calib.timesteps,
                                                            torch.ones(n, nb, nu, dtype=torch.bool)))
    with torch.no_grad():
        r = calib.den.run(full, n, calib.noise, keep_path=True, raw=True)
    delta = max(float((a - b).pow(2).flatten(1).mean(1).max()) for a, b in zip(r.path, inputs[1:])) ** 0.5
    checked = 0
    for fc in ("none", "linear", "taylor"):
        for i, j in ((2, 4), (2, 5), (3, 7), (1, 4)):
            mask = torch.ones(n, nb, nu, dtype=torch.bool)
            mask[i + 1:j] = False
            fast = compile_schedule(calib.model, Schedule.from_mask(calib.model, calib.timesteps, mask, forecast=fc))
            with torch.no_grad():
                path = calib.den.run(fast, n, calib.noise, keep_path=True, raw=True).path
            real = (path[j - 1] - inputs[j]).pow(2).flatten(1).mean(1).double()
            p = i - 1 if fc != "none" else -1   # taylor: the third computed step i - 2, as measured
            measured = costs.per_sample[fc][(p, i)][j - i - 1]
            d = measured.max() ** 0.5
            bound = 10 * (2 * d * delta + delta ** 2) + 1e-12
            assert torch.all((real - measured).abs() <= bound), (fc, i, j, real, measured, bound)
            assert costs.cost(fc, p, i, j) == pytest.approx(float(measured.mean()))
            assert costs.cost(fc, p, i, j, reduce="max") == pytest.approx(float(measured.max()))
            checked += 1
    assert checked == 12
    assert costs.cost("linear", 0, 1, 2) == 0.0             # no step reused
    assert math.isinf(costs.cost("linear", 0, 1, 6))       # longer than max_interval: not measured


def test_segment_costs_are_measured_once_per_anchor_pair():
    """Plain reuse: one run per computed step that can start a segment; linear and Taylor: one per (previous, computed)
    pair with the previous at most max_interval back (the first computed step has none)."""
    calib = _calibration(n=7, samples=1)
    costs = ss.measure_segment_costs(calib, 3)
    n, mi = 7, 3
    want_none = n - 1
    want_linear = 1 + sum(min(i, mi) for i in range(1, n - 1))
    assert len(costs.per_sample["none"]) == want_none and len(costs.per_sample["linear"]) == want_linear
    assert len(costs.per_sample["taylor"]) == want_linear
    assert costs.runs == want_none + 2 * want_linear
    with pytest.raises(ValueError, match="segment costs are measured for forecasts"):
        ss.measure_segment_costs(calib, 3, forecasts=("quadratic",))
    with pytest.raises(ValueError, match="max_interval"):
        ss.measure_segment_costs(calib, 0)


def test_the_searchers_pick_what_their_objective_says():
    """DPCache-style is the exact path-aware sum optimum of the linear table; LeMiCa-style the minimax optimum of the
    plain-reuse table; every pick meets the budget."""
    calib = _calibration(n=7, samples=1)
    costs = ss.measure_segment_costs(calib, 4)
    n, budget = 7, 0.4
    mmax = ss.computed_count(n, budget)
    for name, (fc, _aware, combine) in ss.SEARCHERS.items():
        st = ss.searcher_steps(costs, budget, name)
        assert st[0] == 0 and len(st) <= mmax and (n - len(st)) / n >= budget
    brute = _brute(n, lambda p, i, j: costs.cost("linear", p, i, j), range(1, mmax + 1), 4)
    best = min(v[0] for v in brute.values() if v)
    assert ss.searcher_steps(costs, budget, "dpcache") == best[1]
    brute = _brute(n, lambda p, i, j: costs.cost("none", p, i, j), range(1, mmax + 1), 4, combine="max")
    assert ss.searcher_steps(costs, budget, "lemica") == min(v[0] for v in brute.values() if v)[1]
    with pytest.raises(ValueError, match="searcher must be one of"):
        ss.searcher_steps(costs, budget, "teacache")


# ---------------------------------------------------------------------------------- in the learner
KW = dict(iterations=4, batch_size=2, progress=False, calibration_samples=4, screen_samples=2, hard_fraction=0.5,
          choice_samples=0)   # the choice on the calibration batch alone (the race: test_choice.py)


def test_the_step_search_reaches_the_calibration_batch(monkeypatch):
    """The best screened step-level (set, forecast) pair is measured on the calibration batch; every proposed set
    meets the budget; the pick is one of the pairs measured there."""
    from l2c_kernels.learn import candidates, train_router

    calls = []
    real = candidates._calibration_error

    def counted(calib, mask, forecast):
        err = real(calib, mask, forecast)
        calls.append((calib.noise.shape[0], _mask_key(mask), forecast, err))
        return err

    monkeypatch.setattr(candidates, "_calibration_error", counted)
    res = train_router(tiny_bundle(), 7, budget=0.4, **KW)
    assert res.step_sets and res.segment_costs is not None
    keys = {_mask_key(ss.step_mask(7, st, 2, 2)) for st in res.step_sets}
    on_calib = [e for b, k, _, e in calls if b == 4 and k in keys]
    assert on_calib and res.calibration_error in [e for b, _, _, e in calls if b == 4]
    for st in res.step_sets:   # every proposed set meets the budget
        assert (7 - len(st)) / 7 >= 0.4


def test_a_front_shares_its_measurements_and_is_monotone(monkeypatch):
    """learn_front: segment costs measured once for all budgets (for the largest budget's segments), the routers warm
    started, every schedule meets its budget, and a smaller budget never scores below a larger one on the calibration
    batch."""
    import l2c_kernels as l2c
    from l2c_kernels.learn import router

    measured = []
    real = router.measure_segment_costs

    def once(calib, mi, **k):
        measured.append(mi)
        return real(calib, mi, **k)

    monkeypatch.setattr(router, "measure_segment_costs", once)
    budgets = [0.3, 0.5, 0.7]
    shared = {}
    front = l2c.learn_front(tiny_bundle(), 7, budgets, shared=shared, **KW)
    assert measured == [ss.default_max_interval(7, budgets)]
    # later budgets start from the router before them and train a third of the iterations (at least 2)
    assert shared["warm_iterations"] == 2

    def last_iteration(s):
        return max(h["iteration"] for h in s.params["history"] if "iteration" in h)

    assert [last_iteration(s) for s in front] == [KW["iterations"] - 1, 1, 1]
    assert [s.params["budget"] for s in front] == budgets
    errs = [s.params["calibration_error_db"] for s in front]
    assert all(a <= b + 1e-12 for a, b in zip(errs, errs[1:]))
    for s, b in zip(front, budgets):
        assert s.removed_fraction() >= b - 1e-6
    with pytest.raises(ValueError, match="budgets is empty"):
        l2c.learn_front(tiny_bundle(), 7, budgets=[])
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        l2c.learn_front(tiny_bundle(), 7, budgets=[0.5, 1.0])


def test_a_learned_schedule_beats_uniform_and_random_ones_on_held_out_digits():
    """dit-digits, DDIM 20, half the work removed: on 10 digits whose labels and noise the learner never saw, the
    learned schedule's per-digit PSNR exceeds that of the uniform schedule of the same budget (every 2nd step, each
    forecast) and of random schedules of the same budget, by more than twice the standard error of the paired
    per-digit differences (the margin the measured spread allows)."""
    import l2c_kernels as l2c
    from l2c_kernels import metrics, models, schedules

    bundle = models.load("dit-digits")
    model = bundle.transformer
    steps, budget = 20, 0.5
    learned = l2c.learn_schedule(bundle, steps, budget, iterations=4, batch_size=2, calibration_samples=8,
                                 progress=False, seed=0)
    den = denoiser_for(bundle, 10, None, None, seed=4242)
    noise = den.noise(4242)
    ts = den.timesteps(steps)
    ref, _ = den.sample_with(model, steps, noise)

    def per_digit(sched):
        x, _ = den.sample_with(l2c.compile_schedule(model, sched), steps, noise)
        return metrics.psnr_per_image(x, ref).double()

    mine = per_digit(learned)
    assert learned.flops_removed_fraction() >= budget - 1e-9
    others = {f"uniform-2 {fc}": per_digit(schedules.uniform(model, ts, 2, forecast=fc))
              for fc in ("none", "linear", "quadratic", "taylor")}
    for seed in range(3):
        others[f"random {seed}"] = per_digit(schedules.random_schedule(model, ts, budget, seed=seed))
    for name, theirs in others.items():
        d = mine - theirs
        se = float(d.std() / len(d) ** 0.5)
        assert float(d.mean()) > 2 * se, (name, float(d.mean()), se)


def test_significantly_better_needs_a_paired_difference_beyond_two_standard_errors():
    """The rule the pick transfers by: a candidate replaces the step-level optimum on the calibration batch only if
    mean(d) + 2 se(d) < 0, d the paired per-sample differences of 10 log10(MSE), and its worst sample is no worse."""
    from types import SimpleNamespace

    from l2c_kernels.learn.candidates import significantly_better

    base = torch.linspace(-40, -30, 16, dtype=torch.float64)
    steady = base - 1.0 + 0.1 * torch.sin(torch.arange(16.0)).double()     # 1 dB better everywhere
    lucky = base.clone()
    lucky[:8] -= 6.0
    lucky[8:] += 5.0                                                         # 0.5 dB better on average, by chance
    ruins = steady.clone()
    ruins[15] = -28.0                                                        # better on average, its worst sample worse
    calib = SimpleNamespace(logs={("b", "linear"): base, ("s", "taylor"): steady, ("l", "taylor"): lucky,
                                  ("r", "taylor"): ruins})
    d = lucky - base
    assert float(d.mean()) < 0 and float(d.mean() + 2 * d.std() / 4) > 0
    assert significantly_better(calib, ("s", "taylor"), ("b", "linear"))
    assert not significantly_better(calib, ("l", "taylor"), ("b", "linear"))
    assert not significantly_better(calib, ("b", "linear"), ("b", "linear"))
    d = ruins - base
    assert float(d.mean() + 2 * d.std() / 4) < 0   # the mean alone would let it through
    assert not significantly_better(calib, ("r", "taylor"), ("b", "linear"))
    with pytest.raises(KeyError, match="no per-sample measurement"):
        significantly_better(calib, ("x", "none"), ("b", "linear"))


def test_local_step_search_keeps_the_count_and_only_improves(monkeypatch):
    """Moves shift one computed step (never step 0 or a warm-up step); the result's measured error is the lowest of
    every set it measured, and it spends at most the evaluations it is given (plus the start)."""
    from l2c_kernels.learn import candidates
    from l2c_kernels.learn.candidates import _Best

    calib = _calibration(n=9, samples=2)
    calls = []
    real = candidates._calibration_error

    def counted(c, mask, forecast):
        calls.append(_mask_key(mask))
        return real(c, mask, forecast)

    monkeypatch.setattr(candidates, "_calibration_error", counted)
    seen, best = {}, _Best()
    start = (0, 1, 4, 7)
    found = ss.local_step_search(calib, start, "linear", seen, best, evaluations=6, warm_up=2)
    assert len(found) == len(start) and found[:2] == (0, 1) and len(calls) <= 7
    errs = {k: e for (k, f), e in seen.items()}
    mine = errs[_mask_key(ss.step_mask(9, found, 2, 2))]
    assert mine == min(errs.values()) <= errs[_mask_key(ss.step_mask(9, start, 2, 2))]


def test_the_pick_keeps_the_best_searcher_pick_unless_it_is_significantly_better(monkeypatch):
    """After the pick, the DPCache-, CEM- and LeMiCa-style step sets (each with its forecast) are measured on the
    calibration batch; the learner returns the best of them unless its own pick is significantly better there."""
    from l2c_kernels.learn import router, train_router

    verdicts = []
    real = router.significantly_better

    def spy(calib, a, b, **k):
        v = real(calib, a, b, **k)
        verdicts.append((a, b, v))
        return v

    monkeypatch.setattr(router, "significantly_better", spy)
    res = train_router(tiny_bundle(), 7, budget=0.4, **KW)
    picks = {(_mask_key(ss.step_mask(7, ss.searcher_steps(res.segment_costs, 0.4, name), 2, 2)), fc)
             for name, (fc, _, _) in ss.SEARCHERS.items()}
    mine = (_mask_key(res.mask[1:].float()), res.forecast)
    if verdicts:
        a, b, v = verdicts[-1]
        assert b in picks and a != b
        assert mine == (a if v else b)
    else:
        assert mine in picks


@pytest.mark.parametrize("forecast", ["none", "quadratic"])
def test_a_forecast_the_caller_fixed_is_the_only_one_measured(monkeypatch, forecast):
    """``forecast="none"`` (or any one way): the step search's sets and the searchers' picks are measured that way
    only, whatever their cost table's forecast, and the schedule uses it."""
    from l2c_kernels.learn import candidates, train_router

    used = set()
    real = candidates._calibration_error

    def counted(c, mask, fc):
        used.add(fc)
        return real(c, mask, fc)

    monkeypatch.setattr(candidates, "_calibration_error", counted)
    res = train_router(tiny_bundle(), 7, budget=0.4, forecast=forecast, **KW)
    assert used == {forecast} and res.forecast == forecast and res.step_sets


def test_a_warm_up_asked_for_binds_the_step_search_and_the_searchers():
    """``warm_up=3``: every step set the search proposes and the schedule returned compute steps 0-2."""
    from l2c_kernels.learn import train_router

    res = train_router(tiny_bundle(), 8, budget=0.5, warm_up=3, **KW)
    assert res.step_sets and all(set(range(3)) <= set(st) for st in res.step_sets)
    assert bool(res.mask[:3].all())
    for name in ss.SEARCHERS:
        assert set(range(3)) <= set(ss.searcher_steps(res.segment_costs, 0.5, name, warm_up=3))
