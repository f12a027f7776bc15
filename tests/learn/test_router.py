"""L2C router learning: gradients, budgets, schedules that fit their model."""
from __future__ import annotations

import math

import pytest
import torch

import l2c_kernels as l2c
from l2c_kernels import models  # noqa: E402
from l2c_kernels.learn import schedule_from_scores, train_router
from l2c_kernels.learn.soft_forward import SoftCaches, soft_forward
from l2c_kernels.models import BundledModel
from l2c_kernels.models.configs import NOISE_SCHEDULE
from tests.tiny_models import dit_inputs, pixart_inputs, rel_err, tiny_dit, tiny_pixart


CFG = 1.5


def tiny_bundle():
    return BundledModel("dit-digits", tiny_dit(layers=2), None, dict(NOISE_SCHEDULE), info=dict(recommended_cfg=CFG))


def test_soft_forward_with_full_weights_equals_model():
    for model, inputs in ((tiny_dit(), dit_inputs()), (tiny_pixart(), pixart_inputs())):
        caches = SoftCaches(3, len(l2c.adapters.adapter_for(model).branches(model)))
        out = soft_forward(model, inputs, None, caches)
        assert rel_err(out, model(**inputs).sample) < 1e-5


def test_soft_forward_mixes_cache_and_gradient_reaches_only_router():
    model = tiny_dit(layers=2)
    caches = SoftCaches(2, 2)
    soft_forward(model, dit_inputs(t=900), None, caches)
    w = torch.full((2, 2), 0.5, requires_grad=True)
    out = soft_forward(model, dit_inputs(t=500), w, caches)
    out.pow(2).mean().backward()
    assert w.grad is not None and torch.all(w.grad != 0)
    assert all(p.grad is None for p in model.parameters())
    # w = 1 everywhere is the plain model; w = 0.5 is not
    full = model(**dit_inputs(t=500)).sample
    assert rel_err(out.detach(), full) > 1e-4


def test_train_router_runs_and_leaves_model_frozen():
    bundle = tiny_bundle()
    before = {k: v.clone() for k, v in bundle.transformer.state_dict().items()}
    res = train_router(bundle, 5, budget=0.5, iterations=3, batch_size=2, progress=False)
    assert res.scores.shape == (5, 2, 2)
    assert torch.all(res.scores[0] == 1) and torch.all((res.scores > 0) & (res.scores <= 1))
    assert len(res.timesteps) == 5 and res.history
    assert all(torch.equal(before[k], v) for k, v in bundle.transformer.state_dict().items())
    assert not any(p.requires_grad for p in bundle.transformer.parameters())


@pytest.mark.parametrize("budget", [0.1, 0.25, 0.4, 0.6, 0.8])
def test_budget_selection_hits_requested_flops(budget):
    model = tiny_pixart(layers=4)
    ts = list(range(900, 0, -100))
    scores = torch.rand(len(ts), 4, 3, generator=torch.Generator().manual_seed(1))
    s = schedule_from_scores(model, ts, scores, budget=budget)
    flops = s.branch_flops
    largest = max(flops.values()) / (sum(flops.values()) * len(ts) * 4)
    assert budget <= s.flops_removed_fraction() < budget + largest + 1e-9
    s.validate_for(model)
    assert all(c == "C" for e in s.plan[0] for c in e)
    # the lowest-scored branches are the ones removed
    m = torch.tensor(s.compute_mask())
    assert scores[1:][~m[1:]].max() <= scores[1:][m[1:]].min()


def test_threshold_selection_and_bad_arguments():
    model = tiny_dit(layers=2)
    scores = torch.tensor([[[1.0, 1.0]] * 2, [[0.05, 0.9]] * 2, [[0.2, 0.01]] * 2])
    s = schedule_from_scores(model, [3, 2, 1], scores, threshold=0.1)
    assert s.plan == [["CC", "CC"], ["RC", "RC"], ["CR", "CR"]]
    with pytest.raises(ValueError, match="exactly one"):
        schedule_from_scores(model, [3, 2, 1], scores)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        schedule_from_scores(model, [3, 2, 1], scores, budget=1.5)
    with pytest.raises(ValueError, match="expected"):
        schedule_from_scores(model, [2, 1], scores, budget=0.5)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        l2c.learn.learn_schedule(tiny_bundle(), 4, budget=0.0)


def test_calibrated_pick_is_the_best_measured_hard_schedule_and_refinement_only_improves():
    bundle = tiny_bundle()
    kw = dict(budget=0.5, iterations=6, batch_size=2, progress=False, calibration_samples=2, hard_fraction=0.5,
              structured_candidates=False, step_search=False)
    res = train_router(bundle, 5, **kw)
    assert res.mask is not None and res.mask.shape == (5, 2, 2) and res.mask.dtype == torch.bool
    assert bool(res.mask[0].all()), "the first step must compute everything"
    assert 1 <= res.candidates <= 4  # 3 hard iterations + the final ranking, duplicates measured once
    # the returned error is the mask's real error on the calibration batch, measured independently
    err = _independent_error(bundle, res.timesteps, res.mask, res.forecast)
    assert err == pytest.approx(res.calibration_error, rel=1e-5)
    # the schedule learn_schedule returns is that mask, at the requested budget, with its forecast mode
    s = l2c.learn.learn_schedule(bundle, 5, **kw)
    assert torch.equal(torch.tensor(s.compute_mask()), res.mask) and s.forecast == res.forecast
    # local search keeps the FLOPs and never makes the measured error worse
    ref_res = train_router(bundle, 5, refine_evaluations=4, **kw)
    assert ref_res.calibration_error <= res.calibration_error + 1e-12
    assert int(ref_res.mask.sum()) == int(res.mask.sum())


def test_structured_candidates_hit_the_budget_and_the_pick_is_no_worse_than_any_of_them():
    from l2c_kernels.learn.candidates import _structured_masks

    bundle = tiny_bundle()
    steps, budget = 7, 0.4
    res = train_router(bundle, steps, budget=budget, iterations=4, batch_size=2, progress=False,
                       calibration_samples=2, hard_fraction=0.5, screen_top=None)  # every candidate all three ways
    model = bundle.transformer
    cost = torch.tensor([float(v) for v in l2c.adapters.adapter_for(model).branch_flops(model).values()])
    cost = (cost / cost.sum()).expand(steps - 1, 2, 2)
    hard_budget = budget * steps / (steps - 1)
    largest = float(cost.max() / cost.sum())
    cands = _structured_masks(model, res.timesteps, res.scores[1:], cost, hard_budget)
    assert cands, "some structured masks remove at least the budget"
    for m in cands + [res.mask[1:].float()]:
        removed = float(((1 - m) * cost).sum() / cost.sum())
        assert hard_budget - 1e-6 <= removed < hard_budget + largest + 1e-6
    for m in cands:  # the returned mask and forecast mode are the best measured ones
        for fc in ("none", "linear", "quadratic"):
            full_m = torch.cat([torch.ones_like(m[:1]), m]).bool()
            assert _independent_error(bundle, res.timesteps, full_m, fc) >= res.calibration_error - 1e-6


def _independent_error(bundle, timesteps, mask, forecast, samples=2, seed=7919):
    """The calibration error of ``mask`` ([steps, blocks, branches], True = compute) measured with the public
    API only: the router's calibration batch is ``samples`` (<= 10) digits drawn with seed ``seed`` (its seed 0 + 7919)
    and noise from the same seed; the schedule is built with ``Schedule.from_mask``, sampled with
    ``sampling.sample`` against full compute, and scored as the mean of the mean over samples of 10 log10(MSE),
    10 log10 of the MSE over all samples and the worst sample's 10 log10(MSE)."""

    model = bundle.transformer
    g = torch.Generator().manual_seed(seed)
    labels = torch.randperm(10, generator=g)[:samples].tolist()   # drawn stratified: a permutation per ten
    cfg = model.config
    noise = torch.randn((samples, cfg.in_channels, cfg.sample_size, cfg.sample_size),
                        generator=torch.Generator().manual_seed(seed))
    kw = dict(labels=labels, steps=len(timesteps), cfg=CFG, noise=noise, progress=False)
    full = models.sample(bundle, **kw)
    fast = l2c.compile_schedule(model, l2c.Schedule.from_mask(model, timesteps, mask.bool(), forecast=forecast))
    x = models.sample(bundle, transformer=fast, **kw)
    per_sample = (x.double() - full.double()).pow(2).flatten(1).mean(1).clamp_min(1e-20)
    logs = 10.0 * torch.log10(per_sample)
    return float(logs.mean() + 10.0 * torch.log10(per_sample.mean()) + logs.max()) / 3


@pytest.mark.parametrize("make", [tiny_dit, tiny_pixart])
def test_soft_linear_forecast_with_hard_weights_is_the_runtime_schedule(make):
    """Soft caches with forecast="linear" and 0/1 weights give what compile_schedule runs for that mask
    (extrapolation from the last two computations), and stay differentiable in between."""
    model = make(layers=2)
    ad = l2c.adapters.adapter_for(model)
    nbr = len(ad.branches(model))
    inputs = dit_inputs if make is tiny_dit else pixart_inputs
    ts = [900, 800, 700, 600, 500, 400]
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(len(ts), 2, nbr, generator=g) > 0.5
    mask[0] = True
    sched = l2c.Schedule.from_mask(model, ts, mask, forecast="linear")
    fast = l2c.compile_schedule(model, sched)
    caches = SoftCaches(2, nbr, forecast="linear")
    for s, t in enumerate(ts):
        want = fast(**inputs(t=t)).sample
        got = soft_forward(model, inputs(t=t), None if s == 0 else mask[s].float(), caches)
        assert rel_err(got.detach(), want) < 1e-5, f"step {s}"
    caches = SoftCaches(2, nbr, forecast="linear")
    soft_forward(model, inputs(t=900), None, caches)
    soft_forward(model, inputs(t=800), None, caches)
    w = torch.full((2, nbr), 0.5, requires_grad=True)
    soft_forward(model, inputs(t=700), w, caches).pow(2).mean().backward()
    assert w.grad is not None and torch.all(w.grad != 0)
    with pytest.raises(ValueError, match="forecast"):
        SoftCaches(2, nbr, forecast="cubic")


def test_stepwise_training_is_the_trajectory_objective_with_the_graph_cut_between_steps():
    """Same loss value; the last step's logits get the same gradient (nothing after it to cut); earlier steps
    see only their own step's effect, so their gradients differ; the logits are the only thing that learns."""
    from l2c_kernels.sampling.conditioning import denoiser_for
    from l2c_kernels.learn.rollouts import soft_rollout
    from l2c_kernels.learn.router import _stepwise_iteration

    bundle = tiny_bundle()
    steps, tw = 4, 0.5
    den = denoiser_for(bundle, 2, CFG, "ddim", seed=0)
    den._timesteps = den.timesteps(steps)
    x = den.noise(1)
    with torch.no_grad():
        _, tpath = soft_rollout(den, x, None, keep_path=True)
    scale = tpath[-1].pow(2).mean()
    cost = torch.full((steps - 1, 2, 2), 1.0 / 12)
    g = torch.Generator().manual_seed(0)
    init = torch.randn(steps - 1, 2, 2, generator=g)
    # whole trajectory in one graph
    la = init.clone().requires_grad_(True)
    w = torch.sigmoid(la)
    student, spath = soft_rollout(den, x, torch.cat([torch.ones(1, 2, 2), w]), keep_path=True, forecast="linear")
    final = (student - tpath[-1]).pow(2).mean() / scale
    traj = torch.stack([(a - b).pow(2).mean() for a, b in zip(spath, tpath)]).mean() / scale
    (final + tw * traj).backward()
    # step-wise (soft phase with lam = 0: the error terms only)
    lb = init.clone().requires_grad_(True)
    final_b, loss_b, _ = _stepwise_iteration(den, x, tpath, lb, None, cost, torch.tensor(0.0), False, scale, tw,
                                             "linear")
    assert final_b == pytest.approx(final.item(), rel=1e-5)
    assert loss_b == pytest.approx((final + tw * traj).item(), rel=1e-5)
    torch.testing.assert_close(lb.grad[-1], la.grad[-1], rtol=1e-4, atol=1e-9)
    assert not torch.allclose(lb.grad[:-1], la.grad[:-1], rtol=1e-3, atol=1e-9)
    assert all(p.grad is None for p in bundle.transformer.parameters())


def test_structured_candidates_include_a_warm_up_of_the_first_steps():
    """Every block every k steps after the first warm_up_steps(n) steps computed in full (TaylorSeer's warm-up),
    filled back to the budget like the others: the steps before and at the warm-up's end are computed everywhere."""
    from l2c_kernels.learn.candidates import _structured_masks, warm_up_steps

    model = tiny_dit(layers=4)
    steps = 30
    ts = list(range(999, 0, -33))[:steps]
    cost = torch.full((steps - 1, 4, 2), 1.0 / 8)
    scores = torch.rand(steps - 1, 4, 2, generator=torch.Generator().manual_seed(0))
    w = warm_up_steps(steps)
    assert w == 3 and warm_up_steps(10) == 2
    budget = 0.4 * steps / (steps - 1)
    warm = [m for m in _structured_masks(model, ts, scores, cost, budget) if bool(m[:w].all())]
    assert warm, "a warm-up candidate at 40%"
    for m in warm:
        removed = float(((1 - m) * cost).sum() / cost.sum())
        assert budget - 1e-6 <= removed < budget + 1.0 / (8 * (steps - 1)) + 1e-6
        # after the warm-up: reused cells only where a k-pattern from step w or w + 1 reuses (the fill-back
        # only computes more)
        k = next((k, p) for k in (2, 3, 4, 5) for p in (0, 1)
                 if all(bool(m[i - 1].all()) for i in range(w + p, steps, k)))[0]
        assert all(bool(m[i - 1].all()) for i in range(1, w))
        assert k in (2, 3)


@pytest.mark.parametrize("w, p, k", [(2, 1, 3), (1, 1, 3), (1, 0, 2), (3, 0, 4)])
def test_structured_candidates_hold_each_warm_up_and_phase_exactly_at_its_own_budget(w, p, k):
    """At a budget equal to what "the first w steps, then every k-th from step w + p" removes, that pattern is a
    candidate exactly as it is (no fill-back): (2, 1, 3) is diffusers' TaylorSeer with cache_interval 3 and
    disable_cache_before_step 2 (computes 0, 1, 3, 6, ...)."""
    from l2c_kernels.learn.candidates import _structured_masks

    model = tiny_dit(layers=4)
    steps = 28
    ts = list(range(999, 0, -35))[:steps]
    computed = [s < w or (s >= w + p and (s - w - p) % k == 0) for s in range(steps)]
    if (w, p, k) == (2, 1, 3):
        assert [s for s in range(steps) if computed[s]][:5] == [0, 1, 3, 6, 9]
    want = torch.tensor(computed[1:], dtype=torch.float32)[:, None, None].expand(-1, 4, 2)
    cost = torch.full((steps - 1, 4, 2), 1.0 / 8)
    scores = torch.rand(steps - 1, 4, 2, generator=torch.Generator().manual_seed(1))
    budget = float(((1 - want) * cost).sum() / cost.sum())
    cands = _structured_masks(model, ts, scores, cost, budget)
    assert any(torch.equal(m, want) for m in cands)


def test_calibration_error_weighs_the_typical_sample_and_the_worst_ones():
    """The calibration error is the mean of the mean per-sample log error, the pooled log error and the worst
    sample's log error. Every sample at MSE 1e-3: -30 dB. Nine at 1e-4 and one ruined at 1e-1: mean log
    (9 * -40 - 10) / 10 = -37 dB, pooled 10 log10(0.1009 / 10) = -19.96 dB, worst -10 dB, error -22.32 dB: the schedule
    that ruins an image ranks worse although its typical image is better (by the mean log error alone it would rank
    better)."""
    from l2c_kernels.learn.candidates import error_db

    ref = torch.zeros(10, 1, 4, 4)
    even = ref + 1e-3 ** 0.5
    mse = torch.tensor([1e-4] * 9 + [1e-1], dtype=torch.float64)
    uneven = ref.double() + mse.sqrt()[:, None, None, None]
    want = (-37.0 + 10 * math.log10(float(mse.mean())) + -10.0) / 3
    assert abs(want - -22.32) < 0.01
    assert abs(error_db(uneven, ref.double()) - want) < 1e-9
    assert abs(error_db(even, ref) - -30.0) < 1e-4   # float32 samples
    assert error_db(uneven, ref.double()) > error_db(even, ref)


def test_structured_candidates_with_a_warm_up_all_compute_the_first_steps():
    """With ``warm_up=w`` every structured candidate computes steps 0..w-1 in full and still removes the budget."""
    from l2c_kernels.learn.candidates import _structured_masks

    model = tiny_dit(layers=4)
    steps, w = 30, 4
    ts = list(range(999, 0, -33))[:steps]
    cost = torch.full((steps - 1, 4, 2), 1.0 / 8)
    scores = torch.rand(steps - 1, 4, 2, generator=torch.Generator().manual_seed(0))
    budget = 0.55 * steps / (steps - 1)
    free = _structured_masks(model, ts, scores, cost, budget)
    cands = _structured_masks(model, ts, scores, cost, budget, warm_up=w)
    assert cands and any(not bool(m[:w - 1].all()) for m in free)   # without the warm-up some reuse those steps
    for m in cands:
        assert bool(m[:w - 1].all())
        assert float(((1 - m) * cost).sum() / cost.sum()) >= budget - 1e-6


def test_warm_up_resolves_per_sampler_and_refuses_what_does_not_fit():
    from l2c_kernels.learn.router import _warm_up

    assert _warm_up("auto", 50, 0.6, flow=True) == 5 and _warm_up("auto", 28, 0.6, flow=True) == 3
    assert _warm_up("auto", 50, 0.6, flow=False) == 0        # DDPM samplers: none unless asked
    assert _warm_up("auto", 10, 0.85, flow=True) == 1        # the budget needs the steps: only step 0
    assert _warm_up(4, 20, 0.8, flow=False) == 4
    for bad in (-1, 20, 2.5, True, "5"):
        with pytest.raises(ValueError, match="warm_up"):
            _warm_up(bad, 20, 0.5, flow=True)
    with pytest.raises(ValueError, match="cannot be removed"):
        _warm_up(5, 20, 0.8, flow=False)


@pytest.mark.parametrize("training", ["stepwise", "trajectory"])
def test_learned_schedule_computes_its_warm_up_steps_in_full(training):
    """The warm-up steps are computed in every hard schedule measured and in the one returned; the budget is met
    from the other steps, and the schedule records its warm-up."""
    bundle = tiny_bundle()
    steps, w = 8, 3
    s = l2c.learn_schedule(bundle, steps, 0.5, iterations=4, batch_size=2, calibration_samples=2, progress=False,
                           warm_up=w, training=training, seed=2)
    m = torch.tensor(s.compute_mask())
    assert bool(m[:w].all()) and not bool(m[w:].all())
    assert s.params["warm_up"] == w
    assert 0.5 - 1e-6 <= s.flops_removed_fraction() <= 0.5 + 1.0 / (steps * 4) + 1e-6
    free = l2c.learn_schedule(bundle, steps, 0.5, iterations=4, batch_size=2, calibration_samples=2,
                              progress=False, training=training, seed=2)
    assert free.params["warm_up"] == 0   # DDIM: "auto" is no warm-up


def test_flow_matching_samplers_are_told_apart_from_ddpm_ones():
    """``warm_up="auto"`` warms up on flow-matching samplers: the FlowMatch schedulers and Wan's UniPC with flow
    prediction, not DDIM / DPM++ on an epsilon model."""
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                           UniPCMultistepScheduler)

    from l2c_kernels.sampling.schedulers import samples_flow_matching

    assert samples_flow_matching(FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert samples_flow_matching(UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                         flow_shift=3.0))
    assert not samples_flow_matching(DDIMScheduler())
    assert not samples_flow_matching(DPMSolverMultistepScheduler())
    assert not samples_flow_matching(UniPCMultistepScheduler())
