"""The one timing loop (l2c_kernels/timing.py) on fake runners and clocks: every runner once per round, the order
changing between rounds, warm-up rounds untimed, each call credited to its own runner."""
from __future__ import annotations

import time

import pytest

from l2c_kernels.timing import device_clock, interleave, medians


class FakeClock:
    """A clock that only moves when a runner says how long it took."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fake_runners(clock, durations: dict, calls: list) -> dict:
    """Runners that log their name and advance ``clock`` by their next duration."""
    left = {k: list(v) for k, v in durations.items()}

    def runner(name):
        def run(*args):
            calls.append((name, *args))
            clock.now += left[name].pop(0) if left[name] else 0.0
        return run
    return {name: runner(name) for name in durations}


def test_interleaved_rounds_call_every_runner_once_per_round_in_rotating_order():
    clock, calls = FakeClock(), []
    runners = fake_runners(clock, dict(a=[9, 1, 2, 3], b=[9, 4, 5, 6], c=[9, 7, 8, 9]), calls)
    times = interleave(runners, 3, warmup=1, clock=clock)
    order = [c[0] for c in calls]
    assert order == ["a", "b", "c"] + ["a", "b", "c"] + ["b", "c", "a"] + ["c", "a", "b"]
    # the warm-up round (9 s each) is not timed; each timed call is credited to its own runner
    assert times == dict(a=[1, 2, 3], b=[4, 5, 6], c=[7, 8, 9])


def test_shuffled_rounds_hold_every_runner_once_and_are_reproducible():
    def orders(seed):
        clock, calls = FakeClock(), []
        interleave(fake_runners(clock, {k: [] for k in "abcde"}, calls), 6, warmup=0, order="shuffle",
                   seed=seed, clock=clock)
        names = [c[0] for c in calls]
        return [names[i:i + 5] for i in range(0, 30, 5)]
    rounds = orders(3)
    assert all(sorted(r) == list("abcde") for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # the order changes between rounds
    assert orders(3) == rounds


def test_rounds_given_as_arguments_pass_one_to_every_runner():
    clock, calls = FakeClock(), []
    interleave(fake_runners(clock, dict(a=[], b=[]), calls), [10, 20, 10, 20], warmup=[10, 20], clock=clock)
    assert calls[:4] == [("a", 10), ("b", 10), ("a", 20), ("b", 20)]          # warm-up: one step each
    assert calls[4:] == [("a", 10), ("b", 10), ("b", 20), ("a", 20), ("a", 10), ("b", 10), ("b", 20), ("a", 20)]


def test_stop_ends_the_timing_and_after_round_sees_every_timed_round():
    clock, calls, seen = FakeClock(), [], []
    times = interleave(fake_runners(clock, dict(a=[1] * 9, b=[2] * 9), calls), 5, warmup=0, clock=clock,
                       after_round=lambda k, t: seen.append((k, len(t["a"]))), stop=lambda k: k >= 2)
    assert times == dict(a=[1, 1], b=[2, 2]) and seen == [(0, 1), (1, 2)]


def test_medians_are_those_of_each_runner():
    assert medians(dict(a=[5, 1, 3, 100], b=[2, 8, 4])) == dict(a=4.0, b=4)


def test_the_cpu_clock_is_plain_perf_counter():
    assert device_clock("cpu") is time.perf_counter


@pytest.mark.parametrize("kwargs, match", [
    (dict(order="random"), "order must be one of"),
    (dict(rounds=-1), "a round count must be >= 0"),
])
def test_bad_arguments_are_refused(kwargs, match):
    args = dict(runners=dict(a=lambda: None), rounds=2) | kwargs
    with pytest.raises(ValueError, match=match):
        interleave(args.pop("runners"), args.pop("rounds"), **args)


def test_no_runner_is_refused():
    with pytest.raises(ValueError, match="interleave needs at least one runner"):
        interleave({}, 3)
