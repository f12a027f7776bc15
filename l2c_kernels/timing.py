"""Interleaved timing: every speed this package reports (``l2c bench``, ``measure_step_costs``, the digits' side-by-side
evaluation, the benchmarks under ``bench/``) comes from this one loop.

Each round calls every runner once, in an order that changes from round to round, so a slow stretch of a shared
machine hits every runner alike; a speed is then a ratio of medians from the same run."""
from __future__ import annotations

import random
import statistics
import time

ORDERS = ("rotate", "shuffle")


def interleave(runners: dict, rounds, warmup=1, *, order: str = "rotate", seed: int = 0, clock=time.perf_counter,
               after_round=None, stop=None) -> dict:
    """Seconds of every timed call of every runner: ``{name: [seconds, one per timed round]}``.

    ``warmup`` untimed rounds, then ``rounds`` timed ones; each round calls every runner once, in an order that
    changes from round to round (``"rotate"``: round k starts at runner k mod n; ``"shuffle"``: a new random order
    from ``seed``). ``rounds`` / ``warmup`` may be sequences instead of counts: round k then calls ``fn(rounds[k])``
    (one timestep per round interleaves step by step). ``after_round(k, times)`` runs after timed round k;
    ``stop(k)`` true ends the timing before round k. ``clock``: where seconds are read (:func:`device_clock`
    waits for a GPU's queued work first)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if not runners:
        raise ValueError("interleave needs at least one runner")
    names = list(runners)
    rng = random.Random(seed)
    for args in _round_args(warmup):
        for name in names:
            runners[name](*args)
    times: dict = {name: [] for name in names}
    for k, args in enumerate(_round_args(rounds)):
        if stop is not None and stop(k):
            break
        at = k % len(names)
        ordered = rng.sample(names, len(names)) if order == "shuffle" else names[at:] + names[:at]
        for name in ordered:
            t0 = clock()
            runners[name](*args)
            times[name].append(clock() - t0)
        if after_round is not None:
            after_round(k, times)
    return times


def medians(times: dict) -> dict:
    """``{name: median seconds}`` of :func:`interleave`'s result."""
    return {k: statistics.median(v) for k, v in times.items()}


def _round_args(spec) -> list:
    if isinstance(spec, int):
        if spec < 0:
            raise ValueError(f"a round count must be >= 0, got {spec}")
        return [()] * spec
    return [(a,) for a in spec]


def device_clock(device) -> callable:
    """``time.perf_counter`` that waits for the GPU's queued work first (plain on CPU)."""
    if getattr(device, "type", device) != "cuda":
        return time.perf_counter
    import torch

    def clock():
        torch.cuda.synchronize()
        return time.perf_counter()
    return clock
