"""Speed targets: the budget a schedule needs to run ``s`` times faster than full compute on this device.

A schedule removes a fraction of the units' FLOPs, but part of every step stays whatever a schedule does (the
patch and timestep embeddings, the output layer, the sampler step, guidance, the forecasts' arithmetic), and a
computed step under a schedule costs a little more than a plain one (it stores what later steps reuse). With
``reused`` the time of a step whose every unit is reused and ``computed`` the time of a computed step under the
schedule, both over the plain model's step (measured once, on the device and batch the schedules will run at),
a schedule that removes ``b`` of the unit work costs per step ``reused + (1 - b) (computed - reused)`` of full
compute; the budget for a speedup ``s`` is ``b = 1 - (1 / s - reused) / (computed - reused)``. On a large model
on a GPU ``reused`` is a few percent and ``computed`` close to 1, so the budget is close to ``1 - 1 / s``; on the
bundled CPU models the same speedup needs more removed.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

from ..sampling.denoiser import Denoiser

#: the forecasts whose step costs are measured (the step-level search's cost tables)
SPEED_FORECASTS = ("none", "linear", "taylor")
#: computed steps that open every timed schedule: enough anchors for every forecast (Taylor needs three)
_ANCHORS = 3


@dataclass(frozen=True)
class StepCost:
    """A step under a schedule, over a step of the plain model: every unit reused, and computed (with storing)."""

    reused: float
    computed: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.reused < self.computed:
            raise ValueError(f"a reused step costs less than a computed one and at least 0, got reused "
                             f"{self.reused} and computed {self.computed} (of a plain step)")

    def to_dict(self) -> dict:
        return dict(reused=round(self.reused, 4), computed=round(self.computed, 4))


def _cost(c) -> StepCost:
    return c if isinstance(c, StepCost) else StepCost(float(c))


def measure_step_costs(den: Denoiser, num_inference_steps: int, forecasts=SPEED_FORECASTS,
                       rounds: int = 5, sample=None, seed: int = 0, clock=None) -> dict:
    """``{forecast: StepCost, "pooled": StepCost}`` for ``den``'s model and batch on its device. One warm-up round,
    then ``rounds`` rounds, each running the plain model, every step computed through the runtime, and per forecast
    two schedules through the runtime, in a new random order (``seed``): the first three steps computed and the rest
    reused (``k1`` computed), and every second step computed besides (``k2``); from the medians
    ``t = k t_computed + (n - k) t_reused`` fitted on the three (least squares), over the plain model's step time.
    The run with every step computed pins the computed step's cost: from the two schedules alone it is the slope of
    a difference of two timed runs, which one run's noise (5-10% on a shared CPU) moved by about 10% -- enough to put
    a 2x budget at 50% where 55% was needed.

    ``"pooled"`` solves the same on the mean over the forecasts of each schedule's median: the forecasts' own
    arithmetic differs by far less than the spread of a few timed runs (on the bundled CPU models one forecast's
    computed step came out 0.88 and another's 1.13 of a plain step in the same run), so the pooled costs are the ones
    to place budgets with; the per-forecast ones show that spread.

    ``sample(transformer)`` (default: ``den``'s loop from fixed noise) is one generation as it will be served, so
    what a call costs besides the steps (encoding prompts, building the sampler) is in the times: it is spread over
    the steps, as it is in the speedups the costs predict. ``clock``: where seconds are read (default: ``den``'s
    device's, which waits for a GPU's queued work first)."""
    from ..runtime import compile_schedule
    from ..schedules import computed_steps

    n = int(num_inference_steps)
    if n <= _ANCHORS + 2:
        raise ValueError(f"timing a step's cost needs more than {_ANCHORS + 2} steps, got {n}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    model = getattr(den.transformer, "original_model", den.transformer)
    timesteps = den.timesteps(n)
    den._timesteps = timesteps
    sets = (sorted(range(_ANCHORS)), sorted(set(range(_ANCHORS)) | set(range(0, n, 2))))
    runs = {"full": model, "every step": compile_schedule(model, computed_steps(model, timesteps, range(n)))}
    for f in forecasts:
        for i, st in enumerate(sets):
            runs[(f, i)] = compile_schedule(model, computed_steps(model, timesteps, st, forecast=f))
    med = _timed_medians(den, n, runs, rounds, seed, clock, sample)
    step = med.pop("full") / n
    ks = (len(sets[0]), len(sets[1]), n)
    out = {f: solve_step_cost((med[(f, 0)], med[(f, 1)], med["every step"]), ks, n, step) for f in forecasts}
    out["pooled"] = solve_step_cost(tuple(statistics.fmean(med[(f, i)] for f in forecasts) for i in range(2))
                                    + (med["every step"],), ks, n, step)
    return out


def _timed_medians(den: Denoiser, n: int, runs: dict, rounds: int, seed: int, clock, sample) -> dict:
    """Median seconds of one generation of ``n`` steps with each of ``runs`` (name -> transformer): one warm-up
    round, then ``rounds`` rounds in a new random order each (``seed``). ``sample(transformer)``: one generation
    (default: ``den``'s loop from fixed noise); ``clock``: where seconds are read (default: ``den``'s device's)."""
    from ..timing import device_clock, interleave, medians

    if sample is None:
        noise = den.noise(0)

        def sample(m):
            den.sample_with(m, n, noise)

    def runner(m):
        def run():
            if hasattr(m, "reset"):
                m.reset()
            sample(m)
        return run

    return medians(interleave({k: runner(m) for k, m in runs.items()}, rounds, order="shuffle", seed=seed,
                              clock=clock or device_clock(den.device)))


def measure_speedups(den: Denoiser, num_inference_steps: int, schedules, rounds: int = 5, sample=None,
                     seed: int = 1, clock=None) -> list:
    """The measured speedup of each of ``schedules`` over full compute on ``den``'s model, batch and device: median
    generation times, the plain model and each schedule through ``compile_schedule`` timed in turn, in a new random
    order each round (as :func:`measure_step_costs` times; ``sample``, ``clock`` as there)."""
    from ..runtime import compile_schedule

    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    n = int(num_inference_steps)
    model = getattr(den.transformer, "original_model", den.transformer)
    den._timesteps = den.timesteps(n)
    runs = {"full": model, **{k: compile_schedule(model, s) for k, s in enumerate(schedules)}}
    med = _timed_medians(den, n, runs, rounds, seed, clock, sample)
    return [med["full"] / med[k] for k in range(len(schedules))]


def fitted_span(cost: StepCost, measured) -> float:
    """``computed - reused`` fitted from the measured speedups of schedules, ``measured`` ``[(fraction of the unit
    work removed, speedup)]``: each runs ``1 / speedup = reused + (1 - b) (computed - reused)`` of full compute per
    step; with ``cost.reused`` kept, least squares over the schedules."""
    pts = [(1.0 - float(b), 1.0 / float(m)) for b, m in measured if float(m) > 0 and float(b) < 1.0]
    if not pts:
        raise ValueError("refitting the step cost needs at least one schedule that removes less than all the work "
                         "and was timed")
    return sum(w * (t - cost.reused) for w, t in pts) / sum(w * w for w, _ in pts)


def refit_step_cost(cost: StepCost, measured) -> StepCost:
    """``cost`` with the computed step's cost fitted again from the measured speedups of schedules
    (:func:`fitted_span`), averaged with ``cost``'s own: two estimates of one number, each from a few timed runs (the
    average halves the variance of either); ``reused`` is kept."""
    span = 0.5 * (fitted_span(cost, measured) + (cost.computed - cost.reused))
    return StepCost(cost.reused, cost.reused + max(span, 1e-6))


#: how far (relative) the check's computed step may lie from the calibration's before a second check decides: a
#: calibration resolves it to about +-6% on a shared CPU, so two estimates more than 15% apart are an outlier's
AGREEMENT = 0.15


def check_front(front, budgets, targets, cost: StepCost, den: Denoiser, num_inference_steps: int, rounds: int = 5,
                sample=None) -> dict:
    """Time a front learned at ``budgets`` for speed ``targets`` (placed with ``cost``) against full compute
    (:func:`measure_speedups`), refit the computed step's cost from those timings and say which targets the refit
    moves by a computed step or more. Where the timings' computed step and the calibration's differ by more than
    :data:`AGREEMENT`, one of them is an outlier (a slow stretch of a shared machine): the front is timed a second
    time and the median of the three estimates taken; otherwise their mean (:func:`refit_step_cost`). Returns
    ``{"measured": [speedup per schedule], "measured_again": [...] or None, "refit": StepCost, "budgets": [the
    refit's budget per target] or None (the refit puts a target out of reach), "redo": [targets to learn again]}``."""
    n = int(num_inference_steps)
    removed = [s.flops_removed_fraction() for s in front]
    measured, again = measure_speedups(den, n, front, rounds, sample=sample), None
    placed, timed = cost.computed - cost.reused, fitted_span(cost, list(zip(removed, measured)))
    if abs(timed / placed - 1.0) <= AGREEMENT:
        refit = refit_step_cost(cost, list(zip(removed, measured)))
    else:
        again = measure_speedups(den, n, front, rounds, sample=sample, seed=2)
        span = statistics.median((placed, timed, fitted_span(cost, list(zip(removed, again)))))
        refit = StepCost(cost.reused, cost.reused + max(span, 1e-6))
    try:
        moved = budgets_for_speedups(targets, refit, n)
    except ValueError:
        moved = None
    redo = [] if moved is None else [k for k, (b, b2) in enumerate(zip(budgets, moved)) if abs(b2 - b) >= 1.0 / n]
    return dict(measured=measured, measured_again=again, refit=refit, budgets=moved, redo=redo)


def solve_step_cost(times, ks, n: int, step: float) -> StepCost:
    """The step costs from timed generations of ``n`` steps computing ``ks[i]`` of them in ``times[i]`` seconds, over
    a plain step of ``step`` seconds: ``t = k c + (n - k) r`` fitted for ``c`` and ``r`` by least squares (exact on
    two). A reused step that comes out below 0 (timing noise) is taken as 0; the computed step keeps its value."""
    if len(times) != len(ks) or len(set(ks)) < 2:
        raise ValueError(f"fitting step costs needs timed runs of at least two computed-step counts, got {list(ks)}")
    km, tm = statistics.fmean(ks), statistics.fmean(times)
    diff = sum((k - km) * (t - tm) for k, t in zip(ks, times)) / sum((k - km) ** 2 for k in ks)   # c - r
    reused = (tm - km * diff) / n
    computed = reused + diff
    reused = max(0.0, reused / step)
    return StepCost(reused, max(reused + 1e-6, computed / step))


def budget_for_speedup(speedup: float, cost) -> float:
    """The fraction of unit work to remove for ``speedup`` (``cost``: a :class:`StepCost`, or the reused step's
    cost alone with computed steps as plain ones)."""
    if not speedup > 1.0:
        raise ValueError(f"a speedup target is a factor above 1, got {speedup}")
    c = _cost(cost)
    return 1.0 - (1.0 / speedup - c.reused) / (c.computed - c.reused)


def predicted_speedup(removed: float, cost) -> float:
    """The speedup of a schedule that removes ``removed`` of the unit work (the inverse of
    :func:`budget_for_speedup`)."""
    c = _cost(cost)
    return 1.0 / (c.reused + (1.0 - removed) * (c.computed - c.reused))


def budgets_for_speedups(speedups, cost, num_inference_steps: int) -> list:
    """One budget per speedup target (in the order given). Refuses a target that needs fewer than two computed
    steps in ``num_inference_steps``, naming the fastest reachable."""
    n = int(num_inference_steps)
    most = (n - 2) / n   # step 0 and one more computed
    c = _cost(cost)
    out = []
    for s in speedups:
        b = budget_for_speedup(float(s), c)
        if b > most:
            raise ValueError(
                f"a {float(s):g}x speedup is out of reach at {n} steps on this device: a step with every unit reused "
                f"costs {c.reused:.2f} of a full step, so computing two of {n} steps runs at most "
                f"{predicted_speedup(most, c):.2f}x")
        out.append(max(b, 1.0 / n))
    return out
