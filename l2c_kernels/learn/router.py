"""Learning-to-Cache router, trained along the trajectory the schedule will really produce.

One logit per (step, block, branch); ``w = sigmoid(logit)`` is the weight of the freshly
computed branch output. The student samples the whole trajectory from noise with soft caches
(``cache <- w * fresh + (1 - w) * cache``), the teacher with full compute from the same noise;
the loss is the error of the student's final sample and of its trajectory, plus a penalty on the
FLOPs-weighted mean of ``w`` whose weight adapts so the soft compute fraction approaches the
requested budget. Only the router trains; the model is frozen. Ranking the scores then gives a
static :class:`~l2c_kernels.Schedule` at an exact FLOPs budget or at a threshold.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..adapters import adapter_for
from ..schedule import COMPUTE, REUSE, Schedule
from .conditioning import Denoiser, denoiser_for
from .soft_forward import SoftCaches, soft_forward


@dataclass
class RouterResult:
    scores: torch.Tensor            # [steps, blocks, branches], sigmoid of the logits
    timesteps: list
    history: list = field(default_factory=list)
    seconds: float = 0.0
    mask: torch.Tensor | None = None   # [steps, blocks, branches], True = compute: the best hard schedule measured
    forecast: str = "none"             # how the best schedule's reused outputs are formed
    calibration_error: float | None = None  # of the best schedule: see _calibration_error
    candidates: int = 0


def _rollout(den: Denoiser, x: torch.Tensor, w_all: torch.Tensor | None, keep_path: bool,
             forecast: str = "none") -> tuple:
    """Sample from noise ``x``; ``w_all[s]`` are the compute weights of step s (None: full compute)."""
    model = den.transformer
    ad = adapter_for(model)
    sched = den.make_scheduler()
    sched.set_timesteps(len(den._timesteps))
    caches = SoftCaches(ad.num_blocks(model), len(ad.branches(model)), forecast)
    path = []
    x = x * sched.init_noise_sigma
    for s, t in enumerate(sched.timesteps):
        xin = sched.scale_model_input(den.batch(x), t)
        tt = torch.full((xin.shape[0],), float(t) if t.is_floating_point() else int(t), device=x.device)
        args = dict(den.cond_args, hidden_states=xin, timestep=tt)
        out = soft_forward(model, args, None if w_all is None else w_all[s], caches)
        eps = den.guided(out)
        x = sched.step(eps, t, x).prev_sample
        if keep_path:
            path.append(x)
    return x, path


def train_router(obj, num_inference_steps: int = 20, *, budget: float = 0.4, scheduler: str = "ddim",
                 cfg: float = 1.5, iterations: int = 60, batch_size: int = 4, lr: float = 0.1,
                 trajectory_weight: float = 0.5, init_logit: float = 3.0, seed: int = 0,
                 labels=None, prompts=None, progress: bool = True, log_every: int = 5,
                 hard_fraction: float = 0.5, calibration_samples: int = 8,
                 refine_evaluations: int = 0, structured_candidates: bool = True,
                 forecast: str = "auto") -> RouterResult:
    """Train router logits for ``obj`` (bundled model, its name, or a DiT/PixArt pipeline).

    The first ``1 - hard_fraction`` of the iterations use soft caches with the adaptive FLOPs
    penalty; the rest run the *hard* schedule the scores rank to at ``budget`` (straight-through
    gradients through the sigmoid), so training ends on exactly the decisions inference makes.
    Every hard schedule visited is also measured on a fixed calibration batch
    (``calibration_samples`` samples with their own noise, full compute as the reference): the one
    with the lowest final-image error is returned as ``RouterResult.mask``. With
    ``refine_evaluations > 0`` that mask is then improved by a local search on the same measured
    error: swaps of one computed and one reused branch of the same kind (the FLOPs stay exact),
    proposed by the first-order effect of each flip (the gradient of the error with respect to the
    hard mask) and kept only when the measured error goes down.

    With ``structured_candidates``, step-structured masks are measured as well (the first ``f``
    blocks always computed, the others every ``k`` steps, for every ``f`` up to half the depth and
    ``k`` in 2..5, where that removes at least the budget), each brought to the budget exactly by
    computing again its reused cells with the highest router scores: the learned scores decide which
    cells of a good step structure to keep, and the calibration error decides between structures.

    ``forecast``: what reused branch outputs are (see :class:`~l2c_kernels.Schedule`): ``"none"`` (the
    last computed output), ``"linear"`` / ``"quadratic"`` (extrapolated from the last two / three), or
    ``"auto"`` (default): every candidate is measured all three ways and the best is returned
    (``RouterResult.forecast``). The router itself trains with linear-forecast caches unless
    ``forecast="none"``.

    With a bundled model and no ``labels``/``prompts``, every iteration draws new classes (captions)
    as well as new noise.
    """
    if forecast not in ("auto", "none", "linear", "quadratic"):
        raise ValueError(f"forecast must be 'auto', 'none', 'linear' or 'quadratic', got {forecast!r}")
    train_forecast = "none" if forecast == "none" else "linear"
    forecasts = ("none", "linear", "quadratic") if forecast == "auto" else (forecast,)
    from ..models import BundledModel

    torch.manual_seed(seed)
    den = denoiser_for(obj, batch_size, cfg, scheduler, seed=seed, labels=labels, prompts=prompts)
    vary = isinstance(obj, BundledModel) and labels is None and prompts is None
    model = den.transformer
    ad = adapter_for(model)
    branches = ad.branches(model)
    nb = ad.num_blocks(model)
    flops = ad.branch_flops(model)
    sch = den.make_scheduler()
    sch.set_timesteps(num_inference_steps)
    timesteps = den._timesteps = [t.item() for t in sch.timesteps]
    n = len(timesteps)
    device, dtype = model.device, model.dtype
    cost = torch.tensor([float(flops[b]) for b in branches], device=device)
    cost = (cost / cost.sum()).expand(n - 1, nb, len(branches))
    logits = torch.full((n - 1, nb, len(branches)), init_logit, device=device, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=lr)
    lam = torch.tensor(1e-2)
    gen = torch.Generator().manual_seed(seed)
    target_keep = 1.0 - budget
    hist, t0 = [], time.time()
    model.requires_grad_(False)
    ones = torch.ones((1, nb, len(branches)), device=device)
    hard_budget = min(0.999, budget * n / (n - 1))
    # calibration batch: its own noise and classes, used only to pick among the hard schedules visited
    calib = None
    if calibration_samples and hard_fraction > 0:
        cseed = seed + 7919
        cden = denoiser_for(obj, calibration_samples, cfg, scheduler, seed=cseed,
                            labels=None if labels is None else list(labels)[:calibration_samples] or None,
                            prompts=None if prompts is None else list(prompts)[:calibration_samples] or None)
        cden._timesteps = timesteps
        cg = torch.Generator().manual_seed(cseed)
        cx = torch.randn((cden.num_samples,) + tuple(cden.latent_shape), generator=cg).to(device, dtype)
        with torch.no_grad():
            cref, _ = _rollout(cden, cx, None, keep_path=False)
        calib = _Calibration(cden, cx, cref, model, timesteps, forecasts)
    best, seen = _Best(), {}
    bar = tqdm(range(iterations), desc="learning schedule", disable=not progress)
    for it in bar:
        if vary and it > 0:
            den = denoiser_for(obj, batch_size, cfg, scheduler, seed=seed + 1 + it)
            den._timesteps = timesteps
        x = torch.randn((den.num_samples,) + tuple(den.latent_shape), generator=gen).to(device, dtype)
        with torch.no_grad():
            teacher, tpath = _rollout(den, x, None, keep_path=True)
        w = torch.sigmoid(logits)
        hard = it >= iterations * (1.0 - hard_fraction)
        if hard:
            mask = _budget_mask(w.detach(), cost, hard_budget)
            if calib is not None:
                _consider(calib, mask, seen, best)
            w = mask + w - w.detach()  # straight-through: hard forward, sigmoid gradient
        student, spath = _rollout(den, x, torch.cat([ones, w]), keep_path=True, forecast=train_forecast)
        scale = teacher.pow(2).mean().clamp_min(1e-8)
        final = (student - teacher).pow(2).mean() / scale
        traj = torch.stack([(a - b).pow(2).mean() for a, b in zip(spath, tpath)]).mean() / scale
        keep = (w * cost).sum() / cost.sum()
        loss = final + trajectory_weight * traj + (0.0 if hard else lam * keep)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            logits.clamp_(-5, 5)
            # dual ascent on the penalty: push the soft compute fraction towards 1 - budget
            lam = (lam * torch.exp(torch.tensor(2.0 * (keep.item() - target_keep)))).clamp(1e-5, 10.0)
        if it % log_every == 0 or it == iterations - 1:
            h = dict(iteration=it, hard=bool(hard), loss=round(loss.item(), 6), final_mse=round(final.item(), 6),
                     keep=round(keep.item(), 4), lam=round(lam.item(), 6))
            if hard and calib is not None:
                h["calibration_error_best"] = best.err
            hist.append(h)
        bar.set_postfix(final=f"{final.item():.2e}", keep=f"{keep.item():.2f}")
    scores = torch.cat([torch.ones((1, nb, len(branches))), torch.sigmoid(logits.detach()).cpu()])
    if calib is not None and hard_fraction > 0:  # the schedule the final scores rank to is a candidate too
        mask = _budget_mask(scores[1:].to(device), cost, hard_budget)
        _consider(calib, mask, seen, best)
    if calib is not None and hard_fraction > 0 and structured_candidates:
        for mask in _structured_masks(model, timesteps, scores[1:].to(device), cost, hard_budget):
            _consider(calib, mask, seen, best)
    if best.mask is not None and refine_evaluations > 0:
        best.mask, best.err, refine_hist = _refine_mask(calib, best.mask, best.err, ones, refine_evaluations,
                                                         best.forecast, train_forecast)
        hist.append(dict(refined=True, evaluations=len(refine_hist), calibration_error_best=best.err))
    res = RouterResult(scores=scores, timesteps=timesteps, history=hist, seconds=time.time() - t0,
                       forecast=train_forecast)
    if best.mask is not None:
        res.mask = torch.cat([torch.ones((1, nb, len(branches))), best.mask.cpu()]).bool()
        res.forecast = best.forecast
        res.calibration_error = best.err
        res.candidates = len({key for key, _ in seen})  # distinct masks (each measured per forecast mode)
    return res


@dataclass
class _Calibration:
    """The batch hard schedules are measured on: its denoiser, noise and full-compute samples."""

    den: Denoiser
    noise: torch.Tensor
    reference: torch.Tensor
    model: torch.nn.Module
    timesteps: list
    forecasts: tuple


@dataclass
class _Best:
    mask: torch.Tensor | None = None   # [steps-1, blocks, branches], 1 = compute
    err: float = float("inf")
    forecast: str = "none"


def _calibration_error(calib: _Calibration, mask: torch.Tensor, forecast: str) -> float:
    """Error of the final calibration samples when the hard ``mask`` (steps 1..) runs through
    ``compile_schedule`` with ``forecast`` (the runtime the schedule will use), against full compute:
    the mean over samples of ``10 log10(MSE)`` of each sample, in dB (lower is better; minus the mean
    per-image PSNR, up to the constant ``10 log10(range^2)``).

    Per sample, then averaged in the log domain: the MSE of the whole batch is dominated by its one or
    two worst samples, and which schedule has them on a small calibration batch is luck; the mean log
    error measures the typical image and ranks schedules the same way on other samples."""
    from ..runtime import compile_schedule

    model = calib.model
    full = torch.cat([torch.ones_like(mask[:1]), mask]).bool().cpu()
    fast = compile_schedule(model, Schedule.from_mask(model, calib.timesteps, full, forecast=forecast))
    with torch.no_grad():
        x, _ = calib.den.sample_with(fast, len(calib.timesteps), calib.noise)
    per_sample = (x - calib.reference.clamp(-1, 1)).pow(2).flatten(1).mean(1)  # x is clamped already
    return (10.0 * torch.log10(per_sample.double().clamp_min(1e-20))).mean().item()


def _consider(calib: _Calibration, mask: torch.Tensor, seen: dict, best: _Best) -> None:
    """Measure ``mask`` on the calibration batch once per forecast mode (``seen`` remembers every
    measurement) and keep it in ``best`` if it beats it."""
    key = bytes(mask.to(torch.uint8).flatten().tolist())
    for fc in calib.forecasts:
        if (key, fc) in seen:
            continue
        err = seen[(key, fc)] = _calibration_error(calib, mask, fc)
        if err < best.err:
            best.mask, best.err, best.forecast = mask.clone(), err, fc


def _structured_masks(model, timesteps, scores: torch.Tensor, cost: torch.Tensor, budget: float,
                      intervals=(2, 3, 4, 5), slack: float = 0.2) -> list:
    """Masks ``[steps-1, blocks, branches]`` (1 = compute) of the "first ``f`` blocks always, the rest
    every ``k`` steps" family that remove at least ``budget`` (and at most ``budget + slack``) of the
    cost, each filled back to the budget (to one cell) with its highest-scored reused cells."""
    from ..schedules import first_blocks

    nb = scores.shape[1]
    total = cost.sum()
    out = []
    for k in intervals:
        for f in range(0, nb // 2 + 1):
            m = torch.tensor(first_blocks(model, timesteps, keep_first=f, interval=k).compute_mask(),
                             dtype=scores.dtype, device=scores.device)[1:]
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
                 forecast: str = "none", soft_forecast: str = "none", per_round: int = 4) -> tuple:
    """Local search on the measured calibration error of a hard mask ``[steps-1, blocks, branches]``
    (1 = compute) run with ``forecast``; every move swaps a computed and a reused branch of the same
    kind, proposed by the gradient of the soft rollout (``soft_forecast`` caches)."""
    cden, cx, cref = calib.den, calib.noise, calib.reference
    tried: set = set()
    hist = []
    used = 0
    g = None
    while used < evaluations:
        if g is None:  # gradient of the measured error at the current mask
            w = mask.clone().requires_grad_(True)
            out, _ = _rollout(cden, cx, torch.cat([ones, w]), keep_path=False, forecast=soft_forecast)
            (out - cref).pow(2).mean().backward()
            g = w.grad.detach()
        cands = []
        for i in range(mask.shape[-1]):
            on = (mask[..., i] > 0.5).nonzero().tolist()
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


def schedule_from_scores(model, timesteps, scores: torch.Tensor, *, budget: float | None = None,
                         threshold: float | None = None, method: str = "learned", params: dict | None = None,
                         attn2_cache: str = "per_sample", forecast: str = "none") -> Schedule:
    """A static schedule from router scores: at a FLOPs ``budget`` (remove the lowest-scored branches
    until that fraction of branch FLOPs is removed) or at a ``threshold`` (compute where score > threshold).
    Step 0 always computes everything."""
    if (budget is None) == (threshold is None):
        raise ValueError("give exactly one of budget= or threshold=")
    ad = adapter_for(model)
    branches = ad.branches(model)
    flops = ad.branch_flops(model)
    n, nb, nbr = scores.shape
    if (nb, nbr) != (ad.num_blocks(model), len(branches)) or n != len(timesteps):
        raise ValueError(f"scores have shape {tuple(scores.shape)}; expected ({len(timesteps)}, "
                         f"{ad.num_blocks(model)}, {len(branches)}) for this model and step count")
    compute = torch.ones_like(scores, dtype=torch.bool)
    if threshold is not None:
        compute[1:] = scores[1:] > threshold
    else:
        if not 0.0 < budget < 1.0:
            raise ValueError(f"budget is the fraction of branch FLOPs to remove and must be in (0, 1), got {budget}")
        w = torch.tensor([float(flops[b]) for b in branches])
        total = float(w.sum()) * n * nb
        order = torch.argsort(scores[1:].reshape(-1), stable=True)
        removed = 0.0
        flat = compute[1:].reshape(-1).clone()
        wflat = w.repeat(n - 1, nb, 1).reshape(-1)
        for idx in order.tolist():
            if removed / total >= budget - 1e-9:
                break
            flat[idx] = False
            removed += float(wflat[idx])
        compute[1:] = flat.reshape(n - 1, nb, nbr)
    plan = [["".join(COMPUTE if c else REUSE for c in blk) for blk in row] for row in compute.tolist()]
    p = dict(params or {})
    p.update(budget=budget, threshold=threshold)
    return Schedule(timesteps=list(timesteps), plan=plan, branches=branches, num_blocks=nb,
                    model_class=type(getattr(model, "original_model", model)).__name__, method=method,
                    params=p, branch_flops=flops, attn2_cache=attn2_cache, forecast=forecast)


def learn_schedule(obj, num_inference_steps: int = 20, budget: float = 0.4, *, scheduler: str = "ddim",
                   cfg: float = 1.5, iterations: int = 60, batch_size: int = 4, seed: int = 0,
                   threshold: float | None = None, progress: bool = True, labels=None, prompts=None,
                   **train_kwargs) -> Schedule:
    """Learn a static cache schedule for ``obj`` (a bundled model or its name, or a DiT/PixArt pipeline).

    ``budget`` is the fraction of branch FLOPs to remove (0 < budget < 1); the schedule is exact to
    one branch. ``threshold`` instead keeps every branch whose score exceeds it.
    """
    if not 0.0 < budget < 1.0:
        raise ValueError(f"budget is the fraction of branch FLOPs to remove and must be in (0, 1), got {budget}")
    res = train_router(obj, num_inference_steps, budget=budget, scheduler=scheduler, cfg=cfg,
                       iterations=iterations, batch_size=batch_size, seed=seed, progress=progress,
                       labels=labels, prompts=prompts, **train_kwargs)
    from ..models import BundledModel, load

    model = obj.transformer if isinstance(obj, BundledModel) else (
        load(obj).transformer if isinstance(obj, str) else getattr(obj.transformer, "original_model", obj.transformer))
    params = dict(num_inference_steps=num_inference_steps, scheduler=scheduler, cfg=cfg, iterations=iterations,
                  batch_size=batch_size, seed=seed, train_seconds=round(res.seconds, 1), history=res.history,
                  scores=[[[round(v, 4) for v in blk] for blk in row] for row in res.scores.tolist()])
    if threshold is not None:
        return schedule_from_scores(model, res.timesteps, res.scores, threshold=threshold, params=params,
                                    forecast=res.forecast)
    if res.mask is not None:  # the hard schedule with the lowest measured error on the calibration batch
        params.update(budget=budget, threshold=None, calibration_error_db=res.calibration_error,
                      candidates_measured=res.candidates)
        return Schedule.from_mask(model, res.timesteps, res.mask, method="learned", params=params,
                                  forecast=res.forecast)
    return schedule_from_scores(model, res.timesteps, res.scores, budget=budget, params=params,
                                forecast=res.forecast)
