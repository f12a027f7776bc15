"""What makes learning cheaper keeps its results: screened candidate measurement, the shared teacher trajectories."""
from __future__ import annotations

import pytest
import torch

from l2c_kernels.learn import candidates, train_router
from l2c_kernels.learn.step_search import step_mask
from l2c_kernels.models import BundledModel
from l2c_kernels.models.configs import NOISE_SCHEDULE
from tests.tiny_models import tiny_dit

CFG = 1.5


def tiny_bundle():
    return BundledModel("dit-digits", tiny_dit(layers=2), None, dict(NOISE_SCHEDULE), info=dict(recommended_cfg=CFG))


def _counting(monkeypatch):
    calls = []
    real = candidates._calibration_error

    def counted(calib, mask, forecast):
        err = real(calib, mask, forecast)
        calls.append((forecast, err))
        return err

    monkeypatch.setattr(candidates, "_calibration_error", counted)
    return calls


KW = dict(budget=0.4, iterations=4, batch_size=2, progress=False, calibration_samples=2, hard_fraction=0.5,
          choice_samples=0)   # the measurements on the calibration batch alone (the race's: test_choice.py)


def test_screening_with_every_candidate_confirmed_picks_what_measuring_every_way_picks(monkeypatch):
    calls = _counting(monkeypatch)   # the router's and structured candidates (the step search: test_step_search.py)
    full = train_router(tiny_bundle(), 7, screen_top=None, step_search=False, **KW)
    n_full = len(calls)
    assert n_full == 4 * full.candidates  # every distinct mask, four forecasts
    assert full.calibration_error == min(e for _, e in calls)
    calls.clear()
    screened = train_router(tiny_bundle(), 7, screen_top=10_000, step_search=False, **KW)
    assert len(calls) == n_full and screened.candidates == full.candidates
    assert torch.equal(screened.mask, full.mask) and screened.forecast == full.forecast
    assert screened.calibration_error == full.calibration_error


def test_screening_measures_each_candidate_once_and_confirms_the_best_linear_ones(monkeypatch):
    """Screening: every candidate with the linear forecast, the step-structured ones with the Taylor forecast too;
    the 2 best by their best screened error are then measured the other ways."""
    calls = _counting(monkeypatch)
    res = train_router(tiny_bundle(), 7, screen_top=2, step_search=False, **KW)   # step sets: every way (below)
    fcs = [f for f, _ in calls]
    assert fcs.count("linear") == res.candidates >= 3
    assert fcs.count("none") == fcs.count("quadratic") == 2
    assert 2 <= fcs.count("taylor") <= 2 + res.candidates
    assert res.calibration_error == min(e for _, e in calls)
    screened_calls = list(calls)
    calls.clear()
    unscreened = train_router(tiny_bundle(), 7, screen_top=None, step_search=False, **KW)  # the same training: the same candidates, measured all ways
    assert unscreened.candidates == res.candidates
    # the linear measurements are the same; the screened pick is the best of a subset of the unscreened ones
    assert sorted(e for f, e in screened_calls if f == "linear") == sorted(e for f, e in calls if f == "linear")
    assert unscreened.calibration_error <= res.calibration_error <= min(e for f, e in calls if f == "linear")


def test_screen_top_is_checked():
    with pytest.raises(ValueError, match="screen_top"):
        train_router(tiny_bundle(), 5, screen_top=0, **KW)
    with pytest.raises(ValueError, match="screen_samples"):
        train_router(tiny_bundle(), 5, screen_samples=0, **KW)


def test_a_smaller_screening_batch_screens_every_candidate_and_the_calibration_batch_measures_the_top_pairs(
        monkeypatch):
    """screen_samples < calibration_samples: every candidate is searched on the screening batch only (the router's and
    the structured ones with the linear / Taylor forecast, the step-search sets with their cost table's forecast);
    the screen_top best masks by their best screened error are measured every remaining way there too, and only the
    screen_top best (mask, forecast) pairs of those reach the calibration batch, one measurement each, with the best
    screened pair of the step-level search and the static searchers' picks. The pick is one of those measurements:
    chosen on a batch no candidate was searched on."""
    calls = []
    real = candidates._calibration_error

    def counted(calib, mask, forecast):
        err = real(calib, mask, forecast)
        calls.append((calib.noise.shape[0], candidates._mask_key(mask), forecast, err))
        return err

    monkeypatch.setattr(candidates, "_calibration_error", counted)
    kw = dict(KW, calibration_samples=4)
    res = train_router(tiny_bundle(), 7, screen_top=2, screen_samples=2, **kw)
    screening = [c for c in calls if c[0] == 2]
    confirming = [c for c in calls if c[0] == 4]
    assert len(screening) + len(confirming) == len(calls)
    pairs = [(k, f) for _, k, f, _ in screening]
    assert len(set(pairs)) == len(pairs)   # each candidate once per forecast
    step_keys = {candidates._mask_key(step_mask(7, st, 2, 2)) for st in res.step_sets}
    assert step_keys and all(any(k == kk for kk, _ in pairs) for k in step_keys)   # each with its table's forecast
    best = {}
    for _, k, _, e in screening:
        best[k] = min(e, best.get(k, float("inf")))
    top2 = sorted(best, key=best.get)[:2]
    assert all((k, f) in pairs for k in top2 for f in ("none", "linear", "quadratic", "taylor"))
    want = [(k, f) for _, k, f in sorted((e, k, f) for _, k, f, e in screening if k in top2)[:2]]
    best_step = min((e, k, f) for _, k, f, e in screening if k in step_keys)
    if (best_step[1], best_step[2]) not in want:   # the step-level optimum is always measured there too
        want.append((best_step[1], best_step[2]))
    from l2c_kernels.learn import step_search

    searched = {(candidates._mask_key(step_mask(7, step_search.searcher_steps(res.segment_costs, KW["budget"], nm),
                                                2, 2)), fc) for nm, (fc, _, _) in step_search.SEARCHERS.items()}
    assert {(k, f) for _, k, f, _ in confirming} == set(want) | searched   # and the searchers' picks, once each
    assert len(confirming) == len(set(want) | searched)
    mine = (candidates._mask_key(res.mask[1:]), res.forecast)
    assert res.calibration_error == next(e for _, k, f, e in confirming if (k, f) == mine)


def test_a_screening_batch_as_large_as_the_calibration_batch_is_the_calibration_batch():
    kw = dict(KW, calibration_samples=2)
    a = train_router(tiny_bundle(), 7, screen_top=2, screen_samples=None, **kw)
    b = train_router(tiny_bundle(), 7, screen_top=2, screen_samples=2, **kw)
    assert torch.equal(a.mask, b.mask) and a.forecast == b.forecast and a.calibration_error == b.calibration_error


def test_teacher_pool_computes_each_teacher_once_and_reuses_it_unchanged(monkeypatch):
    """A pool as large as the iterations is exactly a new batch every iteration; a smaller pool computes one teacher
    trajectory per batch and trains on the same noise again."""
    from l2c_kernels.learn import router

    kw = dict(KW, calibration_samples=0, iterations=4)
    a = train_router(tiny_bundle(), 5, teacher_pool=None, **kw)
    b = train_router(tiny_bundle(), 5, teacher_pool=4, **kw)
    assert torch.equal(a.scores, b.scores)
    teachers, students = [], []
    real_soft, real_step = router.soft_rollout, router._stepwise_iteration

    def soft(den, x, w_all, keep_path, **k):
        out = real_soft(den, x, w_all, keep_path, **k)
        if w_all is None:
            teachers.append((x.clone(), [p.clone() for p in out[1]]))
        return out

    def step(den, x, tpath, *args, **k):
        students.append((x.clone(), tpath))
        return real_step(den, x, tpath, *args, **k)

    monkeypatch.setattr(router, "soft_rollout", soft)
    monkeypatch.setattr(router, "_stepwise_iteration", step)
    train_router(tiny_bundle(), 5, teacher_pool=2, **kw)
    assert len(teachers) == 2 and len(students) == 4
    for it, (x, tpath) in enumerate(students):  # iteration it trains on batch it % 2, its teacher unchanged
        tx, tp = teachers[it % 2]
        assert torch.equal(x, tx) and all(torch.equal(p, q) for p, q in zip(tpath, tp))
    assert not torch.equal(students[0][0], students[1][0])
