"""Global search over the step structure: which steps a schedule computes, solved exactly on measured costs.

A step-level schedule computes a set of steps ``S`` (step 0 always) and reuses, or forecasts, every unit at
the other steps. Its error is made of *segments*: a computed step ``i`` (the one before it ``p``), the steps
``i + 1 .. j - 1`` reused from the outputs stored at ``p`` and ``i``, the next computed step ``j`` (or the end,
``j = n``). The cost of a segment is measured once on calibration samples, teacher-forced (DPCache's
path-aware cost tensor): the latents entering step ``p`` and step ``i`` are the full-compute ones, the
schedule's own runtime (``compile_schedule`` on the steps ``p .. j - 1``) computes ``p`` and ``i`` and reuses the
rest, and the cost is the squared error of the latents entering step ``j`` against full compute. One run per
``(p, i)`` gives every ``j`` up to ``i + max_interval``. With plain reuse (``forecast="none"``) the cost does not
depend on ``p`` and one run per ``i`` is enough; the Taylor forecast's third computed step is taken one interval
before ``p`` (:data:`SEGMENT_FORECASTS`).

The sum of the segment costs along a schedule approximates its final error to first order (each segment's
error measured from the exact state), so the best set of computed steps for every count is a shortest path,
solved by dynamic programming over ``(previous computed step, computed step, count)``; :func:`best_step_sets`
returns the ``top`` best sets per count, every phase and interval included. The learner measures the best
few for real (every forecast way), and the searchers below are measured beside the pick: their best is the floor.

The same tables give the static searchers this package compares against (``searcher_steps``): DPCache-style
(path-aware sum, the learner's own DP with one pick), CEM-style (a DP over a path-unaware timestep x interval
error: the cost of reusing from ``i`` to ``j`` whatever came before) and LeMiCa-style (the lexicographic
minimax path: the largest segment error as small as possible).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from ..schedule import Schedule

#: forecasts whose segment costs are measured (path-aware for "linear" and "taylor"); "quadratic" is measured on the
#: picks only. The Taylor forecast reads three computed steps: its segment ``(p, i, j)`` is measured with the third
#: one step ``p - (i - p)`` (the interval before ``p`` repeated; ``p`` alone where that is before step 0), an
#: approximation of the path the real schedule has there -- the picks are measured for real.
SEGMENT_FORECASTS = ("none", "linear", "taylor")


@dataclass
class SegmentCosts:
    """Measured segment errors of one calibration batch.

    ``per_sample[forecast][(p, i)]``: a tensor ``[J, N]``, row ``j - i - 1`` the per-sample mean squared error of
    the latents entering step ``j`` (``j = n``: the final latents) when ``i`` is computed after ``p`` (``p = -1``:
    ``i`` is the first computed step, or the forecast does not look further back) and the steps between reused.
    """

    num_steps: int
    max_interval: int
    per_sample: dict = field(default_factory=dict)
    runs: int = 0            # runtime rollouts measured
    seconds: float = 0.0

    def cost(self, forecast: str, p: int, i: int, j: int, reduce: str = "mean") -> float:
        """The cost of segment ``(p, i, j)`` (``inf`` when not measured: longer than ``max_interval``)."""
        if j == i + 1:
            return 0.0
        key = (p if forecast != "none" else -1, i)
        t = self.per_sample.get(forecast, {}).get(key)
        if t is None or j - i - 1 >= t.shape[0]:
            return math.inf
        row = t[j - i - 1]
        return float(row.max() if reduce == "max" else row.mean())


def _span_schedule(calib, start: int, stop: int, computed: tuple, forecast: str) -> Schedule:
    """The schedule of steps ``start .. stop - 1`` of ``calib``'s timesteps computing ``computed`` only."""
    nb, nu = calib.units_shape
    mask = torch.zeros(stop - start, nb, nu, dtype=torch.bool)
    for s in computed:
        mask[s - start] = True
    return Schedule.from_mask(calib.model, list(calib.timesteps[start:stop]), mask, forecast=forecast,
                              **calib.schedule_kwargs)


def _anchors(forecast: str, p: int, i: int) -> tuple:
    """The computed steps a segment run computes before reusing (see :data:`SEGMENT_FORECASTS`)."""
    if p < 0:
        return (i,)
    if forecast == "taylor" and 2 * p - i >= 0:
        return (2 * p - i, p, i)
    return (p, i)


def _segment_run(calib, teacher, p: int, i: int, stop: int, forecast: str) -> torch.Tensor:
    """Errors ``[stop - i, N]`` of the latents entering steps ``i + 1 .. stop`` (see :class:`SegmentCosts`)."""
    from ..runtime import compile_schedule

    inputs, states = teacher
    anchors = _anchors(forecast, p, i)
    start = anchors[0]
    fast = compile_schedule(calib.model, _span_schedule(calib, start, stop, anchors, forecast))
    errs = []

    def after(s, x, sched):
        if s < i:   # teacher forcing up to the computed step i: its input, and (before it) the sampler's state
            if s == i - 1:   # the steps before only advance the runtime; their sampler state is never read
                sched.__dict__.update(copy.deepcopy(states[i].__dict__))
            return inputs[s + 1]
        errs.append((x - inputs[s + 1]).pow(2).flatten(1).mean(1).double().cpu())
        return x

    n = len(calib.timesteps)
    with torch.no_grad():
        calib.den.run(fast, n, inputs[start], start=start, stop=stop, scheduler=copy.deepcopy(states[start]),
                      after_step=after, raw=True)
    return torch.stack(errs)


def measure_segment_costs(calib, max_interval: int, forecasts=SEGMENT_FORECASTS, warm_up: int = 0,
                          progress: bool = False) -> SegmentCosts:
    """Measure :class:`SegmentCosts` on ``calib`` (a ``candidates._Calibration``) for segments up to ``max_interval``
    steps long (``j - i <= max_interval``), each forecast of ``forecasts`` (``"none"`` and/or ``"linear"``).
    Computed steps before ``warm_up`` are all computed, so their segments are not measured."""
    import time

    from tqdm.auto import tqdm

    bad = [f for f in forecasts if f not in SEGMENT_FORECASTS]
    if bad:
        raise ValueError(f"segment costs are measured for forecasts {SEGMENT_FORECASTS}, got {bad}")
    n = len(calib.timesteps)
    if not isinstance(max_interval, int) or max_interval < 1:
        raise ValueError(f"max_interval must be an integer >= 1, got {max_interval!r}")
    t0 = time.time()
    teacher = calib.den.scheduler_states(n, calib.noise, call=calib.model)
    out = SegmentCosts(n, max_interval)
    first = max(0, warm_up - 1)   # the last warm-up step is the first that can start a segment
    jobs = []
    for fc in forecasts:
        for i in range(first, n - 1):
            ps = [-1] if fc == "none" or i == 0 else list(range(max(0, i - max_interval), i))
            if fc != "none" and 0 < i < warm_up:
                ps = [i - 1]
            jobs += [(fc, p, i) for p in ps]
    for fc, p, i in tqdm(jobs, desc="segment costs", disable=not progress):
        stop = min(n, i + max_interval)
        out.per_sample.setdefault(fc, {})[(p, i)] = _segment_run(calib, teacher, p, i, stop, fc)
        out.runs += 1
    out.seconds = time.time() - t0
    return out


@dataclass(frozen=True)
class StepSet:
    """A set of computed steps and its summed segment cost."""

    steps: tuple
    cost: float


def best_step_sets(num_steps: int, segment_cost, counts, *, max_interval: int, warm_up: int = 0, top: int = 1,
                   combine: str = "sum") -> dict:
    """For every count ``m`` in ``counts``, the ``top`` best sets of ``m`` computed steps (step 0 and the first
    ``warm_up`` steps among them) by ``segment_cost(p, i, j)`` (``p = -1`` for the first computed step;
    ``j = num_steps``: the end), combined along the path by ``"sum"`` or ``"max"`` (the minimax path; ties broken
    by the sum). Returns ``{m: [StepSet, ...]}`` best first (fewer than ``top`` where fewer sets exist).

    Exact: dynamic programming over ``(previous computed step, computed step, count)``, segments at most
    ``max_interval`` long."""
    n = num_steps
    if combine not in ("sum", "max"):
        raise ValueError(f"combine must be 'sum' or 'max', got {combine!r}")
    counts = sorted({int(m) for m in counts})
    if not counts or counts[0] < max(1, warm_up) or counts[-1] > n:
        raise ValueError(f"counts must lie in [{max(1, warm_up)}, {n}], got {counts}")
    mmax = counts[-1]
    top = max(1, int(top))
    memo: dict = {}

    def seg(p, i, j):
        key = (p, i, j)
        v = memo.get(key)
        if v is None:
            v = memo[key] = float(segment_cost(p, i, j))
        return v

    def merge(a, b):   # (primary, secondary) for "max"; (sum, sum) for "sum"
        return (max(a[0], b), a[1] + b) if combine == "max" else (a[0] + b, a[1] + b)

    # dp[(p, i, m)] = sorted list of (score, back) with back = (prev key, rank) or None
    dp: dict = {(-1, 0, 1): [((0.0, 0.0), None)]}
    finals: dict = {m: [] for m in counts}
    for i in range(n):
        for key in [k for k in dp if k[1] == i]:
            p, _, m = key
            entries = dp[key]
            nexts = [i + 1] if i + 1 < warm_up else range(i + 1, min(n, i + max_interval) + 1)
            for j in nexts:
                c = seg(p, i, j)
                if math.isinf(c):
                    continue
                if j == n:
                    if m in finals:
                        finals[m].extend((merge(sc, c), (key, r)) for r, (sc, _) in enumerate(entries))
                    continue
                if m + 1 > mmax:
                    continue
                lst = dp.setdefault((i, j, m + 1), [])
                lst.extend((merge(sc, c), (key, r)) for r, (sc, _) in enumerate(entries))
                lst.sort(key=lambda e: e[0])
                del lst[top:]
    out = {}
    for m in counts:
        fl = sorted(finals[m], key=lambda e: e[0])[:top]
        sets = []
        for sc, back in fl:
            steps = []
            key, r = back
            while key is not None:
                steps.append(key[1])
                _, prev = dp[key][r]
                key, r = prev if prev is not None else (None, 0)
            sets.append(StepSet(tuple(sorted(steps)), sc[0]))
        out[m] = sets
    return out


def step_mask(num_steps: int, steps, num_blocks: int, num_units: int) -> torch.Tensor:
    """The learner's mask ``[steps - 1, blocks, units]`` (1 = compute; rows are steps 1..) of a step set."""
    m = torch.zeros(num_steps - 1, num_blocks, num_units)
    for s in steps:
        if s > 0:
            m[s - 1] = 1.0
    return m


def computed_count(num_steps: int, budget: float) -> int:
    """The most steps a step-level schedule may compute and still remove ``budget`` of the work."""
    return max(1, int(math.floor(num_steps * (1.0 - budget) + 1e-9)))


def default_max_interval(num_steps: int, budgets) -> int:
    """Longest segment measured: twice the mean interval of the largest budget, at least 4, at least what that
    budget's fewest computed steps need to reach the end, and at most the step count."""
    b = max(budgets)
    need = math.ceil(num_steps / computed_count(num_steps, b))
    return max(1, min(num_steps, max(4, math.ceil(2.0 / max(1e-6, 1.0 - b)), need)))


def step_candidate_pairs(costs: SegmentCosts, budget: float, warm_up: int = 0, top: int = 2,
                         forecasts=SEGMENT_FORECASTS) -> list:
    """``(steps, forecast)``: the ``top`` best step sets at ``budget`` (at most :func:`computed_count` steps) of each
    forecast's cost table, with the forecast of the table, best first within a table."""
    n = costs.num_steps
    mmax = computed_count(n, budget)
    lo = max(1, warm_up)
    if mmax < lo:
        return []
    out = []
    for fc in forecasts:
        if fc not in costs.per_sample:
            continue
        res = best_step_sets(n, lambda p, i, j: costs.cost(fc, p, i, j), range(lo, mmax + 1),
                             max_interval=costs.max_interval, warm_up=warm_up, top=top)
        out += [(s.steps, fc) for s in sorted((s for sets in res.values() for s in sets), key=lambda s: s.cost)[:top]]
    return out


def local_step_search(calib, steps, forecast: str, seen: dict, best, evaluations: int, warm_up: int = 0,
                      every_way: bool = False) -> tuple:
    """Hill climbing on the measured error of ``calib`` (real rollouts, not the additive costs) from the computed
    ``steps``: each move shifts one computed step (not step 0, nor a warm-up step) by one or two steps, keeping the
    count; the first move that lowers the error is taken, until no move does or ``evaluations`` rollouts are spent.
    Every measurement goes through ``candidates._consider`` (``seen`` / ``best``; ``every_way``: each set with every
    forecast of ``calib`` as well, the moves still judged by ``forecast``). Returns the final steps."""
    from .candidates import _consider, _mask_key

    n = len(calib.timesteps)
    nb, nu = calib.units_shape
    dev = calib.noise.device

    def err(st):
        m = step_mask(n, st, nb, nu).to(dev)
        _consider(calib, m, seen, best, None if every_way else (forecast,))
        return seen[(_mask_key(m), forecast)]

    cur = tuple(sorted(steps))
    cur_err = err(cur)
    used = 0
    tried = {cur}
    improved = True
    while improved and used < evaluations:
        improved = False
        for k, s in enumerate(cur):
            if s == 0 or s < warm_up:
                continue
            for delta in (-1, 1, -2, 2):
                t = s + delta
                if t <= 0 or t >= n or t in cur or t < warm_up:
                    continue
                cand = tuple(sorted(cur[:k] + (t,) + cur[k + 1:]))
                if cand in tried:
                    continue
                tried.add(cand)
                e = err(cand)
                used += 1
                if e < cur_err:
                    cur, cur_err, improved = cand, e, True
                    break
                if used >= evaluations:
                    break
            if improved or used >= evaluations:
                break
    return cur


#: the static searchers re-implemented on the segment tables: (forecast table, path-aware, combine)
SEARCHERS = {
    "dpcache": ("linear", True, "sum"),
    "cem": ("linear", False, "sum"),
    "lemica": ("none", False, "max"),
}


def searcher_steps(costs: SegmentCosts, budget: float, searcher: str, warm_up: int = 0) -> tuple:
    """The computed steps a static searcher picks at ``budget`` from ``costs`` (see the module docstring).

    - ``"dpcache"``: the path-aware cost of the linear forecast, summed (DPCache's path-aware DP);
    - ``"cem"``: a timestep x interval prior, the cost of a segment ``(i, j)`` whatever came before (taken as the
      linear forecast from the anchor one interval back, the uniform case), summed;
    - ``"lemica"``: the plain-reuse cost, the largest segment as small as possible (LeMiCa's minimax path).
    """
    if searcher not in SEARCHERS:
        raise ValueError(f"searcher must be one of {sorted(SEARCHERS)}, got {searcher!r}")
    fc, aware, combine = SEARCHERS[searcher]
    n = costs.num_steps

    def cost(p, i, j):
        if aware or fc == "none":
            return costs.cost(fc, p, i, j)
        q = i - (j - i)
        c = costs.cost(fc, q if q >= 0 and i > 0 else -1, i, j)
        return c if not math.isinf(c) or i == 0 else costs.cost(fc, i - 1, i, j)   # warm-up: only i - 1 measured

    mmax = computed_count(n, budget)
    res = best_step_sets(n, cost, range(max(1, warm_up), mmax + 1), max_interval=costs.max_interval,
                         warm_up=warm_up, top=1, combine=combine)
    sets = [s for v in res.values() for s in v]
    if not sets:
        raise ValueError(f"no step set of at most {mmax} computed steps with segments of at most "
                         f"{costs.max_interval} steps: measure longer segments")
    return min(sets, key=lambda s: s.cost).steps
