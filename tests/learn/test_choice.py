"""The final choice raced on new calibration batches (learn/choice.py): a clear winner costs no further batch, a near
tie spends the sample budget, a finalist significantly worse on the samples so far drops out, the winner has the
lowest error over every sample measured; and in the learner, the pick is the race's winner (or the searchers' best
where the winner does not beat it beyond the noise of every sample measured)."""
from __future__ import annotations

import pytest
import torch

from l2c_kernels.learn import choice
from l2c_kernels.learn.candidates import _mask_key, error_db, error_from_logs, logs_better
from l2c_kernels.learn import step_search as ss
from tests.learn.test_step_search import KW, tiny_bundle


def test_the_error_of_logs_is_the_calibration_error_of_the_samples():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(6, 1, 4, 4, generator=g)
    x = ref + torch.randn(6, 1, 4, 4, generator=g) * torch.linspace(0.01, 1.0, 6)[:, None, None, None]
    mse = (x - ref).pow(2).flatten(1).mean(1).double()
    assert error_from_logs(10 * torch.log10(mse)) == pytest.approx(error_db(x, ref), abs=1e-9)


class Batches:
    """Further batches of ``n`` samples whose per-sample errors each finalist draws from ``means`` (+ unit noise)."""

    def __init__(self, means: dict, n: int = 4, seed: int = 0):
        self.means, self.n, self.calls = means, n, []
        self.g = torch.Generator().manual_seed(seed)
        self.noise = {}

    def first(self) -> dict:
        return {e: self.draw(0, e) for e in self.means}

    def more(self, k):
        self.calls.append(k)
        return k

    def draw(self, k, e):
        if (k, e) not in self.noise:
            self.noise[(k, e)] = torch.randn(self.n, generator=self.g, dtype=torch.float64)
        return self.means[e] + self.noise[(k, e)]

    def measure(self, k, e):
        return self.draw(k, e)


def test_a_clear_winner_needs_no_further_batch():
    b = Batches({"a": -40.0, "b": -20.0, "c": -25.0})
    winner, logs = choice.race(b.first(), b.more, b.measure, max_samples=64)
    assert winner == "a" and b.calls == [] and list(logs) == ["a"]


def test_a_tie_spends_the_sample_budget_and_the_lowest_error_over_every_sample_wins():
    b = Batches({"a": -30.0, "b": -30.0})
    winner, logs = choice.race(b.first(), b.more, b.measure, max_samples=16)
    assert b.calls == [1, 2, 3]                      # 4 samples, then 3 more batches of 4: 16
    assert all(len(v) == 16 for v in logs.values())
    pooled = {e: torch.cat([b.draw(k, e) for k in range(4)]) for e in "ab"}
    assert winner == min(pooled, key=lambda e: error_from_logs(pooled[e]))
    assert all(torch.equal(logs[e], pooled[e]) for e in "ab")


def test_a_finalist_significantly_worse_on_the_samples_so_far_drops_out():
    """Level on the first batch, "b" 10 dB worse on every later one: it leaves after the second batch, and the race
    ends there with "a" alone."""
    b = Batches({"a": -30.0, "b": -30.0})
    b.noise[(0, "a")] = b.noise[(0, "b")] = torch.zeros(4, dtype=torch.float64)
    b.means = {"a": -30.0, "b": -30.0}
    first = b.first()
    b.means = {"a": -30.0, "b": -20.0}
    winner, logs = choice.race(first, b.more, b.measure, max_samples=64)
    assert winner == "a" and b.calls == [1] and list(logs) == ["a"]
    assert logs_better(torch.cat([first["a"], b.draw(1, "a")]), torch.cat([first["b"], b.draw(1, "b")]))


def test_finalists_are_the_best_measurements_and_the_ones_asked_for():
    seen = {("m1", "linear"): -30.0, ("m2", "none"): -35.0, ("m3", "taylor"): -20.0, ("m1", "none"): -25.0}
    assert choice.finalists(seen, 2) == [("m2", "none"), ("m1", "linear")]
    assert choice.finalists(seen, 2, also=(("m3", "taylor"),)) == [("m2", "none"), ("m1", "linear"), ("m3", "taylor")]


def test_the_learner_picks_the_race_winner(monkeypatch):
    """With ``choice_samples`` above the calibration batch the learner races its finalists; the schedule it returns
    is the winner, or the searchers' best where the winner is not better beyond the noise of every sample."""
    from l2c_kernels.learn import router, train_router

    races = []
    real = router.race

    def spy(logs, more, measure, max_samples, **k):
        out = real(logs, more, measure, max_samples, **k)
        races.append((list(logs), out))
        return out

    monkeypatch.setattr(router, "race", spy)
    res = train_router(tiny_bundle(), 7, budget=0.4, **dict(KW, choice_samples=12))
    assert len(races) == 1
    entries, (winner, logs) = races[0]
    entry = [h for h in res.history if "choice_samples" in h][0]
    assert entry["finalists"] == len(entries) and entry["left"] == len(logs)
    assert entry["choice_samples"] in (4, 8, 12) and all(len(v) == entry["choice_samples"] for v in logs.values())
    mine = (_mask_key(res.mask[1:].float()), res.forecast)
    searched = {_mask_key(ss.step_mask(7, ss.searcher_steps(res.segment_costs, 0.4, name), 2, 2))
                for name in ss.SEARCHERS}
    if mine != winner:   # the best searcher pick left in the race, which the winner does not beat beyond the noise
        left = [e for e in logs if e[0] in searched]
        assert entry["kept_searcher_pick"] and mine == min(left, key=lambda e: error_from_logs(logs[e]))
        assert not logs_better(logs[winner], logs[mine])
    assert all(any(e[0] == k for e in entries) for k in searched)   # every searcher's set was a finalist
    assert entry["choice_error"] == pytest.approx(error_from_logs(logs[mine]), abs=1e-9)


@pytest.mark.parametrize("kw, match", [
    (dict(choice_samples=-1), "choice_samples must be an integer >= 0, got"),
    (dict(choice_top=0), "choice_top must be an integer >= 1, got"),
])
def test_bad_choice_settings_are_refused(kw, match):
    from l2c_kernels.learn import train_router

    with pytest.raises(ValueError, match=match):
        train_router(tiny_bundle(), 7, budget=0.4, **dict(KW, **kw))
