"""Measuring hard schedules on a calibration batch, and the candidate schedules the learner measures.

A candidate is a mask ``[steps-1, blocks, branches]`` (1 = compute; step 0 always computes). It is
run through ``compile_schedule`` -- the runtime the schedule will use -- on a fixed calibration
batch (its own noise and conditions, full compute as the reference), once per forecast mode, and
the best is kept. Candidates: the hard schedules the router visits, the "first ``f`` blocks always,
the rest every ``k`` steps" family filled back to the budget by router score, and a local search of
swaps guided by the gradient of the soft rollout.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..schedule import Schedule
from ..sampling.denoiser import Denoiser
from .rollouts import soft_rollout


@dataclass
class _Calibration:
    """The batch hard schedules are measured on: its denoiser, noise and full-compute samples."""

    den: Denoiser
    noise: torch.Tensor
    reference: torch.Tensor
    model: torch.nn.Module
    timesteps: list
    forecasts: tuple
    branches: list | None = None   # the units learned when not the model's default level (SD3 / Flux branch level)
    schedule_kwargs: dict = field(default_factory=dict)   # Schedule.from_mask's branches= and unit costs
    units_shape: tuple = ()   # (blocks, units) of a mask row
    logs: dict = field(default_factory=dict)   # (mask key, forecast) -> per-sample 10 log10(MSE) of each measurement


@dataclass
class _Best:
    mask: torch.Tensor | None = None   # [steps-1, blocks, branches], 1 = compute
    err: float = float("inf")
    forecast: str = "none"
    masks: dict = field(default_factory=dict)   # every mask measured, by key (for confirm_screened)


def _calibration_error(calib: _Calibration, mask: torch.Tensor, forecast: str) -> float:
    """Error of the final calibration samples when the hard ``mask`` (steps 1..) runs through
    ``compile_schedule`` with ``forecast`` (the runtime the schedule will use), against full compute, in dB
    (lower is better): the mean of three terms, the mean over samples of each sample's ``10 log10(MSE)`` (minus
    the mean per-image PSNR, up to the constant ``10 log10(range^2)``) and ``10 log10`` of the batch's MSE
    (minus the PSNR of the whole batch, as the comparison tables report it) and the worst sample's
    ``10 log10(MSE)``.

    The first measures the typical image: alone it ranks schedules the same way on other samples as long as
    none fails outright. The second is dominated by the one or two worst samples, and catches the schedules
    that ruin one image in ten (a forecast that overshoots on some samples): on flux-digits the mean log error
    alone could not tell a schedule with such a sample (26.9 dB over 10 digits) from one without (35.5 dB). The
    third holds the pick to its worst image outright: on a batch of 16 the pooled term is diluted by the other
    fifteen, and a schedule that ruins one sample in a hundred is what a user sees as a redrawn image."""
    from ..runtime import compile_schedule

    model = calib.model
    full = torch.cat([torch.ones_like(mask[:1]), mask]).bool().cpu()
    fast = compile_schedule(model, Schedule.from_mask(model, calib.timesteps, full, forecast=forecast,
                                                      **calib.schedule_kwargs))
    x, _ = calib.den.sample_with(fast, len(calib.timesteps), calib.noise)
    mse = _sample_mse(x, calib.reference)
    calib.logs[(_mask_key(mask), forecast)] = (10.0 * torch.log10(mse)).cpu()
    return _error_from_mse(mse)


#: standard errors by which a candidate must beat the static searchers' best pick on the calibration batch to replace it
SIGNIFICANCE_Z = 2.0


def significantly_better(calib: _Calibration, a: tuple, b: tuple, z: float = SIGNIFICANCE_Z) -> bool:
    """Whether measurement ``a`` = ``(mask key, forecast)`` beats ``b`` on ``calib`` beyond its noise
    (:func:`logs_better` on their per-sample errors there)."""
    la, lb = calib.logs.get(a), calib.logs.get(b)
    if la is None or lb is None:
        raise KeyError(f"no per-sample measurement of {'a' if la is None else 'b'} on this batch")
    return logs_better(la, lb, z)


def logs_better(la: torch.Tensor, lb: torch.Tensor, z: float = SIGNIFICANCE_Z) -> bool:
    """Whether per-sample errors ``la`` (``10 log10(MSE)``, the same samples as ``lb``) beat ``lb`` beyond their
    noise: the mean of the paired differences plus ``z`` standard errors is below zero (``z = 2``: a one-sided test
    at about 98%), and ``la``'s worst sample is no worse than ``lb``'s. A pick made on a batch of 16 transfers only
    where the difference it rests on is larger than what another batch of 16 would move; and a schedule that is
    better on average but ruins a sample the other keeps is not a better schedule."""
    d = (la - lb).double()
    if float(la.max()) > float(lb.max()):
        return False
    if d.numel() < 2:
        return bool(d.mean() < 0)
    return bool(d.mean() + z * d.std() / d.numel() ** 0.5 < 0)


def error_db(x: torch.Tensor, reference: torch.Tensor) -> float:
    """The calibration error of samples ``x`` (``[N, ...]``) against ``reference``: the mean of three terms in dB,
    the mean per-sample ``10 log10(MSE)`` (the typical image), ``10 log10`` of the MSE over all samples (the batch
    as the comparison tables report it) and the worst sample's ``10 log10(MSE)`` (see :func:`_calibration_error`)."""
    return _error_from_mse(_sample_mse(x, reference))


def _sample_mse(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error (float64, floored at 1e-20) of ``x`` against ``reference``."""
    return (x - reference).pow(2).flatten(1).mean(1).double().clamp_min(1e-20)


def _error_from_mse(per_sample: torch.Tensor) -> float:
    """:func:`error_db` from the per-sample errors."""
    return error_from_logs(10.0 * torch.log10(per_sample))


def error_from_logs(logs: torch.Tensor) -> float:
    """:func:`error_db` from the per-sample ``10 log10(MSE)``."""
    logs = logs.double()
    pooled = 10.0 * torch.log10(torch.pow(10.0, logs / 10.0).mean())
    return ((logs.mean() + pooled + logs.max()) / 3.0).item()


def _mask_key(mask: torch.Tensor) -> bytes:
    return bytes(mask.to(torch.uint8).flatten().tolist())


def _consider(calib: _Calibration, mask: torch.Tensor, seen: dict, best: _Best, forecasts=None) -> None:
    """Measure ``mask`` on the calibration batch once per forecast mode in ``forecasts`` (default: all of
    ``calib.forecasts``; ``seen`` remembers every measurement) and keep it in ``best`` if it beats it."""
    key = _mask_key(mask)
    best.masks.setdefault(key, mask.clone())
    for fc in calib.forecasts if forecasts is None else forecasts:
        if (key, fc) in seen:
            continue
        err = seen[(key, fc)] = _calibration_error(calib, mask, fc)
        if err < best.err:
            best.mask, best.err, best.forecast = best.masks[key], err, fc


def _confirm_screened(calib: _Calibration, seen: dict, best: _Best, top: int,
                      screened: tuple | None = None, screen_calib: _Calibration | None = None,
                      always: tuple = ()) -> None:
    """Screened measurement: every candidate was measured with one or two forecasts only.

    On one batch (``screened`` None: ``calib``'s own ``seen`` / ``best``): the ``top`` masks by their best screened
    error are measured with every forecast of ``calib.forecasts`` (those not measured yet).

    On two (``screened = (seen, best)`` of the screening batch ``screen_calib`` the candidates were searched on): the
    ``top`` masks are first measured every forecast way on the screening batch (cheap), then the ``top`` best
    (mask, forecast) pairs of those are measured on ``calib``, a batch no candidate was searched on, and the pick is
    the best of them there. ``always``: masks (keys) whose best screened pair is measured on ``calib`` as well
    (the step-level search's sets: the pick never scores below the best of them there)."""
    s_seen, s_best = screened if screened is not None else (seen, best)
    by_key: dict = {}
    for (key, _fc), err in s_seen.items():
        by_key[key] = min(err, by_key.get(key, float("inf")))
    ranked = [key for _, key in sorted((err, key) for key, err in by_key.items())[:top]]
    if screened is None or screen_calib is None:
        for key in ranked:
            _consider(calib, s_best.masks[key], seen, best)
        return
    for key in ranked:
        _consider(screen_calib, s_best.masks[key], s_seen, s_best)
    pairs = sorted((err, key, fc) for (key, fc), err in s_seen.items() if key in set(ranked))
    chosen = [(key, fc) for _, key, fc in pairs[:top]]
    extra = sorted((err, key, fc) for (key, fc), err in s_seen.items() if key in set(always))
    if extra and (extra[0][1], extra[0][2]) not in chosen:
        chosen.append((extra[0][1], extra[0][2]))
    for key, fc in chosen:
        _consider(calib, s_best.masks[key], seen, best, (fc,))


def warm_up_steps(num_steps: int) -> int:
    """Steps computed in full at the start of a warm-up candidate: 10% of the steps, at least 2."""
    return max(2, round(0.1 * num_steps))


def _structured_masks(model, timesteps, scores: torch.Tensor, cost: torch.Tensor, budget: float,
                      intervals=(2, 3, 4, 5), slack: float = 0.2, warm_up: int = 0) -> list:
    """Masks ``[steps-1, blocks, branches]`` (1 = compute) of the "first ``f`` blocks always, the rest
    every ``k`` steps" family that remove at least ``budget`` (and at most ``budget + slack``) of the
    cost, each filled back to the budget (to one cell) with its highest-scored reused cells.

    With ``f = 0`` (every block every ``k`` steps) also warm-up variants: the first ``w`` steps computed
    in full (``w`` = 1, 2 and :func:`warm_up_steps`), then every ``k``-th step from step ``w`` or ``w + 1``
    (TaylorSeer's and cache-dit's warm-up, TaylorSeer's phase among them; the first steps, where the
    latents change fastest, are where reuse costs most, and with a forecast the phase of the computed
    steps alone moves the error by several dB).

    ``warm_up``: the first steps every mask computes (``train_router``'s ``warm_up``): the warm-up variants
    start no earlier, the others compute these steps as well."""
    from ..schedules import first_blocks

    nb = scores.shape[1]
    total = cost.sum()
    out = []
    n = len(timesteps)
    shapes = [(k, f, 0, 0) for k in intervals for f in range(0, nb // 2 + 1)]
    shapes += [(k, 0, w, p) for k in intervals for w in sorted({max(v, warm_up) for v in (1, 2, warm_up_steps(n))})
               for p in (0, 1) if w + p + k < n]
    for k, f, w, p in shapes:
        if w:  # steps < w, then w + p, w + p + k, ...: computed (row i of the mask is step i + 1)
            computed = [i < w or (i >= w + p and (i - w - p) % k == 0) for i in range(1, n)]
            m = torch.tensor(computed, dtype=scores.dtype, device=scores.device)[:, None, None].expand(
                -1, nb, scores.shape[-1]).clone()
        else:
            m = torch.tensor(first_blocks(model, timesteps, keep_first=f, interval=k).compute_mask(),
                             dtype=scores.dtype, device=scores.device)[1:]
            if m.shape[-1] != scores.shape[-1]:  # a block-level pattern over branch-level units: every unit alike
                m = m[..., :1].expand(*m.shape[:-1], scores.shape[-1]).clone()
            m[:max(0, warm_up - 1)] = 1.0
        removed = float(((1 - m) * cost).sum() / total)
        if removed < budget - 1e-6 or removed > budget + slack:  # float32 sums: exact budgets within 1e-6
            continue
        flat_m, flat_c, flat_s = m.reshape(-1), cost.reshape(-1), scores.reshape(-1)
        off = (flat_m < 0.5).nonzero().flatten()
        for c in off[torch.argsort(flat_s[off], descending=True, stable=True)].tolist():
            share = float(flat_c[c] / total)
            if removed - share >= budget - 1e-6:
                flat_m[c] = 1.0
                removed -= share
        out.append(flat_m.reshape(m.shape))
    return out


def _refine_mask(calib: _Calibration, mask: torch.Tensor, err: float, ones: torch.Tensor, evaluations: int,
                 forecast: str = "none", soft_forecast: str = "none", per_round: int = 4,
                 fixed_rows: int = 0) -> tuple:
    """Local search on the measured calibration error of a hard mask ``[steps-1, blocks, branches]``
    (1 = compute) run with ``forecast``; every move swaps a computed and a reused branch of the same
    kind, proposed by the gradient of the soft rollout (``soft_forecast`` caches). The first ``fixed_rows`` rows
    (warm-up steps) stay computed."""
    cden, cx, cref = calib.den, calib.noise, calib.reference
    tried: set = set()
    hist = []
    used = 0
    g = None
    while used < evaluations:
        if g is None:  # gradient of the measured error at the current mask
            w = mask.clone().requires_grad_(True)
            out, _ = soft_rollout(cden, cx, torch.cat([ones, w]), keep_path=False, forecast=soft_forecast,
                                  branches=calib.branches)
            (out - cref).pow(2).mean().backward()
            g = w.grad.detach()
        cands = []
        for i in range(mask.shape[-1]):
            on = [c for c in (mask[..., i] > 0.5).nonzero().tolist() if c[0] >= fixed_rows]
            off = (mask[..., i] < 0.5).nonzero().tolist()
            if not on or not off:
                continue
            # first-order change of the error: reuse a computed cell (-g), compute a reused cell (+g)
            on.sort(key=lambda c: -float(g[c[0], c[1], i]))
            off.sort(key=lambda c: float(g[c[0], c[1], i]))
            for a in on[:per_round]:
                for b in off[:per_round]:
                    gain = -float(g[a[0], a[1], i]) + float(g[b[0], b[1], i])
                    key = (a[0], a[1], b[0], b[1], i)
                    if key not in tried:
                        cands.append((gain, key))
        if not cands:
            break
        cands.sort()
        improved = False
        for gain, key in cands[:per_round]:
            if used >= evaluations:
                break
            tried.add(key)
            a0, a1, b0, b1, i = key
            m2 = mask.clone()
            m2[a0, a1, i], m2[b0, b1, i] = 0.0, 1.0
            e2 = _calibration_error(calib, m2, forecast)
            used += 1
            hist.append(e2)
            if e2 < err:
                mask, err, improved, g = m2, e2, True, None
                break
        if not improved and len(cands) <= per_round:
            break
    return mask, err, hist


def _budget_mask(scores: torch.Tensor, cost: torch.Tensor, budget: float) -> torch.Tensor:
    """1 = compute: remove the lowest-scored cells until ``budget`` of the (cost-weighted) work is removed."""
    flat_s, flat_c = scores.reshape(-1), cost.reshape(-1)
    order = torch.argsort(flat_s, stable=True)
    removed = torch.cumsum(flat_c[order], 0) / flat_c.sum()
    # steps 1.. only: step 0 (always computed) is not in ``scores``; scale the budget accordingly
    n_off = int(torch.searchsorted(removed, torch.tensor(budget, dtype=removed.dtype) - 1e-9).item()) + 1
    mask = torch.ones_like(flat_s)
    mask[order[:n_off]] = 0.0
    return mask.reshape(scores.shape)

