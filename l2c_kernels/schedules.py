"""Hand-made schedules: the baselines a learned schedule is compared with.

Every function returns a :class:`~l2c_kernels.Schedule` for ``model`` and the sampler's
``timesteps`` (in call order). Step 0 always computes everything.
"""
from __future__ import annotations

import random as _random
from typing import Sequence

from .adapters import adapter_for
from .schedule import BLOCK, COMPUTE, REUSE, Schedule


def _facts(model):
    ad = adapter_for(model)
    return ad.num_blocks(model), ad.branches(model), ad.branch_flops(model)


def _make(model, timesteps, plan, method, params, attn2_cache="per_sample", forecast="none") -> Schedule:
    nb, branches, flops = _facts(model)
    return Schedule(timesteps=list(timesteps), plan=plan, branches=branches, num_blocks=nb,
                    model_class=type(getattr(model, "original_model", model)).__name__, method=method,
                    params=params, branch_flops=flops, attn2_cache=attn2_cache, forecast=forecast)


def full(model, timesteps: Sequence[int]) -> Schedule:
    """Compute everything at every step."""
    nb, branches, _ = _facts(model)
    return _make(model, timesteps, [[COMPUTE * len(branches)] * nb for _ in timesteps], "full", {})


def computed_steps(model, timesteps: Sequence[int], computed, forecast: str = "none", method: str = "steps",
                   params: dict | None = None) -> Schedule:
    """Every branch (block) computed at the steps in ``computed`` (step 0 among them), reused -- or forecast -- at
    every other step."""
    steps = sorted({int(s) for s in computed})
    n = len(timesteps)
    if not steps or steps[0] != 0 or steps[-1] >= n:
        raise ValueError(f"computed steps must include step 0 and lie in [0, {n - 1}], got {list(computed)[:8]}")
    nb, branches, _ = _facts(model)
    on = set(steps)
    plan = [[(COMPUTE if i in on else REUSE) * len(branches)] * nb for i in range(n)]
    return _make(model, timesteps, plan, method, dict(params or {}, computed=steps), forecast=forecast)


def uniform(model, timesteps: Sequence[int], interval: int = 2, forecast: str = "none") -> Schedule:
    """FORA: recompute every branch every ``interval`` steps, reuse all of them in between
    (``forecast="linear"``: extrapolated from the last two computations, see :class:`Schedule`)."""
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    s = computed_steps(model, timesteps, range(0, len(timesteps), interval), forecast, "uniform",
                       dict(interval=interval))
    s.params.pop("computed")
    return s


def warm_up_interval(model, timesteps: Sequence[int], warm_up: int, interval: int, forecast: str = "linear") -> Schedule:
    """TaylorSeer's structure as a static schedule: the first ``warm_up`` steps computed, then every ``interval``-th
    from step ``warm_up``, with ``forecast`` in between."""
    if warm_up < 1 or interval < 1:
        raise ValueError(f"warm_up and interval must be >= 1, got {warm_up} and {interval}")
    n = len(timesteps)
    steps = [s for s in range(n) if s < warm_up or (s - warm_up) % interval == 0]
    return computed_steps(model, timesteps, steps, forecast, "warm_up_interval",
                          dict(warm_up=warm_up, interval=interval))


def deepcache(model, timesteps: Sequence[int], interval: int = 3, keep_first: int = 2, keep_last: int = 1,
              mode: str = "block") -> Schedule:
    """DeepCache-style: full steps every ``interval``; in between, the first ``keep_first`` and the last
    ``keep_last`` blocks are computed and the middle ones reused (``mode="block"``: their cached residual,
    ``mode="branch"``: their cached branch outputs with fresh gates)."""
    nb, branches, _ = _facts(model)
    if keep_first + keep_last > nb or min(keep_first, keep_last) < 0:
        raise ValueError(f"keep_first + keep_last must be within 0..{nb}")
    reuse = BLOCK if mode == "block" else REUSE * len(branches)
    plan = []
    for i in range(len(timesteps)):
        if i % interval == 0:
            plan.append([COMPUTE * len(branches)] * nb)
        else:
            plan.append([COMPUTE * len(branches) if (b < keep_first or b >= nb - keep_last) else reuse
                         for b in range(nb)])
    return _make(model, timesteps, plan, "deepcache",
                 dict(interval=interval, keep_first=keep_first, keep_last=keep_last, mode=mode))


def tgate(model, timesteps: Sequence[int], gate_step=15, sp_interval: int = 3, fi_interval: int = 1,
          warm_up: int = 2) -> Schedule:
    """T-GATE (TGATE-V2, as its authors' ``tgate`` package runs it).

    Cross-attention is computed at steps ``0 .. gate_step - 1``; at step ``gate_step - 1`` the mean of its
    two classifier-free-guidance halves is cached, and steps ``gate_step ..`` reuse it (so ``gate_step``
    steps compute cross-attention). Self-attention is computed at steps ``0 .. warm_up``, then at every
    step ``i % sp_interval == 0`` and at step ``gate_step - 1`` before the gate, and at every step
    ``i % fi_interval == 0`` after it; in between its last output is reused. The MLP is always computed.
    The authors' PixArt setting is ``gate_step=15, sp_interval=3, fi_interval=1, warm_up=2`` for 25 steps.

    A :class:`~l2c_kernels.learn.gate.GateResult` is accepted as ``gate_step`` (its gate, checked against these
    timesteps); :func:`l2c_kernels.learn.gate.auto_tgate` measures one on calibration prompts and builds the
    schedule.
    """
    nb, branches, _ = _facts(model)
    if "attn2" not in branches:
        raise ValueError(f"T-GATE caches cross-attention; {type(model).__name__} has none (branches {branches})")
    n = len(timesteps)
    gate_info = None
    if isinstance(gate_step, str):
        raise ValueError(f"gate_step must be an int or a GateResult, got {gate_step!r}; to measure the gate on "
                         "calibration prompts use l2c_kernels.learn.gate.auto_tgate")
    if hasattr(gate_step, "gate_step") and hasattr(gate_step, "curve"):
        gate_info = gate_step
        gate_info.check_timesteps(timesteps)
    if gate_info is not None:
        gate_step = gate_info.gate_step
    if isinstance(gate_step, bool) or not isinstance(gate_step, int) or not 1 <= gate_step <= n:
        raise ValueError(f"gate_step must be in 1..{n} for {n} steps (the number of steps that compute "
                         f"cross-attention), got {gate_step!r}")
    if sp_interval < 1 or fi_interval < 1 or warm_up < 0:
        raise ValueError("sp_interval and fi_interval must be >= 1 and warm_up >= 0")
    plan = []
    for i in range(n):
        if i < gate_step:
            a1 = i <= warm_up or i % sp_interval == 0 or i == gate_step - 1
        else:
            a1 = i % fi_interval == 0
        letters = {"attn1": a1, "attn2": i < gate_step, "ff": True}
        plan.append(["".join(COMPUTE if letters[b] else REUSE for b in branches)] * nb)
    params = dict(gate_step=gate_step, sp_interval=sp_interval, fi_interval=fi_interval, warm_up=warm_up)
    if gate_info is not None:
        params["auto_gate"] = gate_info.to_dict()
    return _make(model, timesteps, plan, "tgate", params, attn2_cache="cfg_mean")


def first_blocks(model, timesteps: Sequence[int], keep_first: int = 4, interval: int = 3) -> Schedule:
    """Static analogue of DBCache: blocks ``< keep_first`` always computed, the others every ``interval`` steps."""
    return deepcache(model, timesteps, interval=interval, keep_first=keep_first, keep_last=0, mode="branch")


def _mask_to_plan(mask) -> list[list[str]]:
    return [["".join(COMPUTE if c else REUSE for c in blk) for blk in row] for row in mask]


def _flops_removed(mask, weights) -> float:
    total = sum(sum(weights) for row in mask for _ in row)
    kept = sum(sum(w for w, c in zip(weights, blk) if c) for row in mask for blk in row)
    return 1.0 - kept / total


def random_schedule(model, timesteps: Sequence[int], budget: float, seed: int = 0) -> Schedule:
    """Random reuse of branches (never at step 0) until ``budget`` of branch FLOPs is removed."""
    _check_budget(budget)
    nb, branches, flops = _facts(model)
    w = [float(flops[b]) for b in branches]
    rng = _random.Random(seed)
    mask = [[[True] * len(branches) for _ in range(nb)] for _ in timesteps]
    cells = [(s, b, i) for s in range(1, len(timesteps)) for b in range(nb) for i in range(len(branches))]
    rng.shuffle(cells)
    for s, b, i in cells:
        if _flops_removed(mask, w) >= budget:
            break
        mask[s][b][i] = False
    return _make(model, timesteps, _mask_to_plan(mask), "random", dict(budget=budget, seed=seed))


def block_caching(model, timesteps: Sequence[int], change_curves, budget: float) -> Schedule:
    """Block Caching (Wimbauer et al.): each branch is recomputed once its accumulated relative change
    since its last computation exceeds a threshold; the threshold is searched so that ``budget`` of the
    branch FLOPs is removed. ``change_curves[step][block][branch]`` is the measured relative change of the
    branch output from the previous step (see :func:`l2c_kernels.learn.change_curves.measure_change_curves`)."""
    _check_budget(budget)
    nb, branches, flops = _facts(model)
    w = [float(flops[b]) for b in branches]
    n = len(timesteps)
    if len(change_curves) != n:
        raise ValueError(f"change_curves has {len(change_curves)} steps, expected {n}")

    def mask_for(th):
        mask = [[[True] * len(branches) for _ in range(nb)] for _ in range(n)]
        for b in range(nb):
            for i in range(len(branches)):
                acc = 0.0
                for s in range(1, n):
                    acc += float(change_curves[s][b][i])
                    if acc <= th:
                        mask[s][b][i] = False
                    else:
                        acc = 0.0
        return mask

    lo, hi = 0.0, 1e3
    for _ in range(60):
        mid = (lo + hi) / 2
        if _flops_removed(mask_for(mid), w) < budget:
            lo = mid
        else:
            hi = mid
    return _make(model, timesteps, _mask_to_plan(mask_for(hi)), "block_caching",
                 dict(budget=budget, threshold=hi))


def _check_budget(budget: float) -> None:
    if not 0.0 < budget < 1.0:
        raise ValueError(f"budget is the fraction of branch FLOPs to remove and must be in (0, 1), got {budget}")


__all__ = ["full", "uniform", "deepcache", "tgate", "first_blocks", "random_schedule", "block_caching"]
