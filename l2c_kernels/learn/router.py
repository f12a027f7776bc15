"""Learning-to-Cache router, trained along the trajectory the schedule will really produce.

One logit per (step, block, branch); ``w = sigmoid(logit)`` is the weight of the freshly
computed branch output. The student samples from noise with soft caches
(``cache <- w * fresh + (1 - w) * cache``), the teacher with full compute from the same noise; the
loss is the error of the student's latents against the teacher's after every step (the last step's
error -- the final image's -- weighted most), plus a penalty on the FLOPs-weighted mean of ``w``
whose weight adapts so the soft compute fraction approaches the requested budget. Only the router
trains; the model is frozen.

``training="stepwise"`` (default) follows HarmoniCa's step-wise denoising training: the student
runs along its own trajectory, each step's loss is back-propagated into that step's logits at once,
and the graph is cut before the next step, so memory does not grow with the number of steps.
``training="trajectory"`` back-propagates the whole trajectory at once (memory grows with the
steps). Hard schedules visited, and structured ones, are measured on a calibration batch through
``compile_schedule`` (``candidates.py``); the best becomes the :class:`~l2c_kernels.Schedule`.

``learn_schedule`` takes what the user has (see ``conditioning.py``): a diffusers pipeline with its
labels or prompts, a bundled model (or its name), or a transformer with ``scheduler=``,
``conditions=`` and ``latent_shape=``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..adapters import adapter_for
from ..schedule import COMPUTE, FORECASTS, REUSE, Schedule, sampler_info
from .candidates import (_Best, _budget_mask, _Calibration, _calibration_error, _confirm_screened,  # noqa: F401
                         _consider, _mask_key, _refine_mask, _structured_masks, error_from_logs, logs_better,
                         significantly_better, warm_up_steps)
from .choice import finalists, measure_on, race
from ..sampling.conditioning import denoiser_for
from ..sampling.denoiser import Denoiser
from .rollouts import soft_rollout, stepwise_rollout
from ..sampling.schedulers import samples_flow_matching
from .units import learning_units
from .step_search import (SEARCHERS, default_max_interval, local_step_search, measure_segment_costs, searcher_steps,
                          step_candidate_pairs, step_mask)

_rollout = soft_rollout  # the name earlier releases used
TRAINING_MODES = ("stepwise", "trajectory")


@dataclass
class RouterResult:
    scores: torch.Tensor            # [steps, blocks, branches], sigmoid of the logits
    timesteps: list
    history: list = field(default_factory=list)
    seconds: float = 0.0
    mask: torch.Tensor | None = None   # [steps, blocks, branches], True = compute: the best hard schedule measured
    forecast: str = "none"             # how the best schedule's reused outputs are formed
    calibration_error: float | None = None  # of the best schedule: see candidates._calibration_error
    candidates: int = 0
    branch_flops: dict = field(default_factory=dict)   # per branch and sample, at the real token counts
    units: object = None               # units.LearningUnits: columns, per-unit costs, Schedule.from_mask args
    denoiser_info: dict = field(default_factory=dict)
    warm_up: int = 0                   # first steps computed in full by every schedule (step 0 included)
    segment_costs: object = None       # step_search.SegmentCosts measured on the screening batch (step_search=True)
    step_sets: list = field(default_factory=list)   # the computed-step sets the step-level search proposed


#: router training iterations when none are asked (learn_schedule, train_router, ``l2c learn``)
DEFAULT_ITERATIONS = 12


def _denoiser(obj, num_samples, cfg, scheduler, seed, labels, prompts, height, width, conditions, latent_shape,
              max_sequence_length, true_cfg_scale=None, negative_prompt=None, cond_first=False, model_timestep=None):
    return denoiser_for(obj, num_samples, cfg, scheduler, seed=seed, labels=labels, prompts=prompts, height=height,
                        width=width, conditions=conditions, latent_shape=latent_shape,
                        max_sequence_length=max_sequence_length, true_cfg_scale=true_cfg_scale,
                        negative_prompt=negative_prompt, cond_first=cond_first, model_timestep=model_timestep)


def train_router(obj, num_inference_steps: int = 20, *, budget: float = 0.4, scheduler=None,
                 cfg: float | None = None, guidance_scale: float | None = None, iterations: int = DEFAULT_ITERATIONS,
                 batch_size: int = 4, lr: float = 0.1, trajectory_weight: float = 0.5, init_logit: float = 3.0,
                 seed: int = 0, labels=None, prompts=None, height: int | None = None, width: int | None = None,
                 conditions: dict | None = None, latent_shape=None, max_sequence_length: int | None = None,
                 progress: bool = True, log_every: int = 5,
                 hard_fraction: float = 0.5, calibration_samples: int = 16, refine_evaluations: int = 0,
                 structured_candidates: bool = True, forecast: str = "auto", training: str = "stepwise",
                 teacher_pool: int | None = 4, true_cfg_scale: float | None = None,
                 negative_prompt=None, branches: list | None = None, screen_top: int | None = 3,
                 screen_samples: int | None = 4, warm_up: int | str = "auto", step_search: bool = True,
                 max_interval: int | None = None, step_top: int = 2, step_refine: int = 12,
                 choice_samples: int = 64, choice_top: int = 4,
                 cond_first: bool = False, model_timestep=None, shared: dict | None = None) -> RouterResult:
    """Train router logits for ``obj`` (pipeline, bundled model or its name, or a transformer: see
    :func:`learn_schedule`).

    The first ``1 - hard_fraction`` of the iterations use soft caches with the adaptive FLOPs
    penalty; the rest run the *hard* schedule the scores rank to at ``budget`` (straight-through
    gradients through the sigmoid), so training ends on exactly the decisions inference makes.
    Every hard schedule visited is also measured on a fixed calibration batch
    (``calibration_samples`` samples with their own noise, full compute as the reference): the one
    with the lowest final-image error is returned as ``RouterResult.mask``. With
    ``refine_evaluations > 0`` that mask is then improved by a local search on the same measured
    error (swaps of one computed and one reused branch of the same kind, proposed by the gradient).

    With ``structured_candidates``, step-structured masks are measured as well (the first ``f``
    blocks always computed, the others every ``k`` steps), each brought to the budget exactly by
    computing again its reused cells with the highest router scores.

    ``forecast``: what reused branch outputs are: ``"none"``, ``"linear"``, ``"quadratic"``, ``"taylor"``
    (see :class:`~l2c_kernels.schedule.Schedule`), or ``"auto"`` (default: candidates are measured every way
    and the best is returned).

    ``screen_top`` (with ``forecast="auto"``; default 3): measure every candidate with the linear forecast
    only (the step-structured ones with the Taylor forecast as well), then the ``screen_top`` best of them
    (by their best screened error) every other way as well (None: every candidate every way, about four
    times the measuring). ``screen_samples`` (default 4; None or at least
    ``calibration_samples``: screen on the calibration batch itself): screen on a smaller batch of this many
    samples with its own noise and reference, and measure only the ``screen_top`` best on the calibration batch,
    every forecast way; the pick is the best of those (about half the measuring again).

    ``warm_up``: the first steps (step 0 included) that every schedule computes in full: an integer (binding every
    candidate, the step search's included), or ``"auto"`` (default): the router's and the structured candidates, with
    a flow-matching sampler (:func:`~l2c_kernels.sampling.schedulers.samples_flow_matching`), compute 10% of the steps,
    at least 2 (:func:`~l2c_kernels.learn.candidates.warm_up_steps`; fewer where the budget needs them), otherwise
    none; the step search measures sets with and without that warm-up and lets the measurement choose.
    The router neither trains nor reuses them. The calibration batch cannot show what such a warm-up buys: on
    flux-digits at 50 steps, schedules that reuse the second or third step ruin about one sample in 10-40 (a
    digit redrawn, 15-25 dB where the rest are at 40-45), a rare event a batch of 8-10 seldom holds
    (``bench/NOTES.md``); TaylorSeer and cache-dit warm up for the same reason. The DDPM digits models' schedules
    were learned without one (not measured with).

    ``step_search`` (default True): the global search over the step structure (``step_search.py``): segment
    costs measured on the screening batch (segments up to ``max_interval`` steps; default
    :func:`~l2c_kernels.learn.step_search.default_max_interval`), and the ``step_top`` best sets of computed steps
    of each cost table (plain reuse, linear and Taylor forecasts), with and without the warm-up, screened with their
    table's forecast as candidates (the best masks are measured every way before the choice); from the best of them on the screening batch, a local search of ``step_refine`` real rollouts
    there (one computed step moved by one or two steps at a time: where the segment costs do not add up). On the
    calibration batch the static searchers' picks on the same costs (DPCache-, CEM- and LeMiCa-style, each with its
    forecast) are measured too, and the pick replaces the best of them only where it is better there by more than
    two standard errors of the paired per-sample differences, with no worse a worst sample
    (:func:`~l2c_kernels.learn.candidates.significantly_better`): a pick that wins by less than the batch's noise
    does not transfer to other samples.

    ``choice_samples`` (default 64; at most ``calibration_samples``: off): the final choice among the ``choice_top``
    best measurements on the calibration batch and the searchers' picks is raced on further batches of
    ``calibration_samples`` new samples, one batch at a time, until one is left or this many samples are used
    (:func:`~l2c_kernels.learn.choice.race`: a finalist significantly worse than the leader on every sample so far
    drops out); the searchers' rule above is then applied on every sample measured, to the best of their picks
    still in the race.

    ``shared``: a dict that several calls on the same model, steps, seed and batches fill and reuse (the
    calibration and screening batches with their references, the teacher pool, the segment costs):
    :func:`learn_front` passes one across budgets.

    ``training``: ``"stepwise"`` (default; memory independent of the step count) or ``"trajectory"``
    (see the module docstring). ``teacher_pool``: draw the training noise (and, where the model draws
    them, labels) from this many fixed batches whose full-compute trajectories are computed once
    (default 4; None: a new batch, and its teacher, every iteration).

    ``branches``: what a schedule decides, where a model has more than one level: None (the model's default:
    DiT / PixArt branches, whole blocks for the pattern-table families), ``["block"]``, or SD3 / Flux units
    (``adapters.mmdit_branches.branch_names(model)``, or a subset) for branch level on two-stream blocks. On
    SD3 / Flux the budget is a fraction of FLOPs counted per unit (block) on a real call at the real token counts
    (``units.learning_units``).

    Without ``labels``/``prompts``, a model whose conditions are drawn (DiT classes, bundled digits)
    gets new ones for every batch of the pool (every iteration without a pool) as well as new noise.

    The router's defaults (12 iterations, a pool of 4 teacher trajectories, candidates screened on a batch of 4)
    learned better schedules than 30 iterations without them (``learn_speed_screening.md``, bench/NOTES.md, measured
    before the step search and the race). With every default, the first budget of a front at DDIM 50 took 649 s on
    dit-digits and 161-348 s on the flux-digits models (1 CPU thread beside another job,
    ``bench/results/front_<model>_50.md``).
    """
    if forecast not in ("auto",) + FORECASTS:
        raise ValueError(f"forecast must be 'auto' or one of {', '.join(map(repr, FORECASTS))}, got {forecast!r}")
    if training not in TRAINING_MODES:
        raise ValueError(f"training must be one of {', '.join(TRAINING_MODES)}, got {training!r}")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 2:
        raise ValueError(f"num_inference_steps must be an integer >= 2, got {num_inference_steps!r}")
    if cfg is not None and guidance_scale is not None and float(cfg) != float(guidance_scale):
        raise ValueError("give guidance_scale= or cfg= (the same thing), not both")
    cfg = guidance_scale if guidance_scale is not None else cfg
    train_forecast = "none" if forecast == "none" else "linear"
    forecasts = FORECASTS if forecast == "auto" else (forecast,)
    if screen_top is not None and (not isinstance(screen_top, int) or screen_top < 1):
        raise ValueError(f"screen_top must be None or an integer >= 1, got {screen_top!r}")
    if screen_samples is not None and (not isinstance(screen_samples, int) or screen_samples < 1):
        raise ValueError(f"screen_samples must be None or an integer >= 1, got {screen_samples!r}")
    if isinstance(choice_samples, bool) or not isinstance(choice_samples, int) or choice_samples < 0:
        raise ValueError(f"choice_samples must be an integer >= 0, got {choice_samples!r}")
    if isinstance(choice_top, bool) or not isinstance(choice_top, int) or choice_top < 1:
        raise ValueError(f"choice_top must be an integer >= 1, got {choice_top!r}")
    screen = (train_forecast,) if (screen_top is not None and len(forecasts) > 1) else None
    cond_kw = dict(height=height, width=width, conditions=conditions, latent_shape=latent_shape,
                   max_sequence_length=max_sequence_length, true_cfg_scale=true_cfg_scale,
                   negative_prompt=negative_prompt, cond_first=cond_first, model_timestep=model_timestep)

    shared = {} if shared is None else shared
    torch.manual_seed(seed)
    den = _denoiser(obj, batch_size, cfg, scheduler, seed, labels, prompts, **cond_kw)
    model = den.transformer
    units = learning_units(den, branches)  # the router's columns and what each (block, column) costs
    asked, branches, nb, flops = units.branches, units.names, units.num_blocks, units.branch_flops
    timesteps = den.timesteps(num_inference_steps)
    den._timesteps = timesteps
    n = len(timesteps)
    warm = _warm_up(warm_up, n, budget, flow=samples_flow_matching(den.make_scheduler()))
    fixed = max(0, warm - 1)   # rows of the [steps - 1] masks that the warm-up computes
    step_warm = warm if warm_up != "auto" else 0   # a warm-up asked for binds the step search too; "auto" does not
    device = den.device
    cost = units.cost.to(device=device, dtype=torch.float32)  # [blocks, columns]; DiT / PixArt: every row alike
    cost = (cost / cost[0].sum()).expand(n - 1, nb, len(branches))
    logits = torch.full((n - 1, nb, len(branches)), init_logit, device=device, dtype=torch.float32,
                        requires_grad=True)
    warm_start = shared.get("router_logits")   # a front: the previous budget's router, trained on for fewer iterations
    if warm_start is not None and tuple(warm_start.shape) == tuple(logits.shape):
        with torch.no_grad():
            logits.copy_(warm_start.to(device))
        iterations = shared.get("warm_iterations", iterations)
    opt = torch.optim.Adam([logits], lr=lr)
    lam = torch.tensor(1e-2)
    gen = torch.Generator().manual_seed(seed)
    target_keep = 1.0 - budget
    hist, t0 = [], time.time()
    model.requires_grad_(False)
    ones = torch.ones((1, nb, len(branches)), device=device)
    hard_budget = min(0.999, budget * n / (n - 1))
    # calibration batch: its own noise and conditions, used only to pick among the hard schedules visited
    def calibration(num: int, cseed: int) -> _Calibration:
        cden = _denoiser(obj, num, cfg, scheduler, cseed,  # cfg as asked: Flux keeps den.cfg apart
                         None if labels is None else list(labels)[:num] or None,
                         None if prompts is None else list(prompts)[:num] or None,
                         **dict(cond_kw, negative_prompt=negative_prompt if isinstance(negative_prompt, (str, type(None)))
                                else list(negative_prompt)[:num]))
        cden._timesteps = timesteps
        cx = cden.noise(cseed)
        cref, _ = cden.sample_with(model, n, cx)
        return _Calibration(cden, cx, cref, model, timesteps, forecasts, asked, units.schedule_kwargs,
                            (nb, len(branches)))

    def extra_batch(k: int) -> _Calibration:   # the k-th batch the final choice races on (shared across a front)
        key = ("choice batch", calibration_samples, k)
        if key not in shared:
            shared[key] = calibration(calibration_samples, seed + 7919 + 7 * k)
        return shared[key]

    calib = scal = None
    if calibration_samples and hard_fraction > 0:
        key = ("calibration", calibration_samples, screen_samples if screen is not None else None)
        if key not in shared:
            calib = scal = calibration(calibration_samples, seed + 7919)
            if screen is not None and screen_samples is not None and screen_samples < calibration_samples:
                scal = calibration(screen_samples, seed + 7927)  # the screening batch: its own noise and conditions
            shared[key] = (calib, scal)
        calib, scal = shared[key]
    best, seen = _Best(), {}
    # candidates are measured on the screening batch (the calibration batch itself unless a smaller one is asked)
    sbest, sseen = (best, seen) if scal is calib else (_Best(), {})
    pool: dict = shared.setdefault(("pool", batch_size, teacher_pool), {})

    def batch(it):
        """(denoiser, noise, teacher path) of iteration ``it``."""
        key = it if teacher_pool is None else it % max(1, int(teacher_pool))
        if key in pool:
            return pool[key]
        d = den if (key == 0 or den.redraw is None) else den.redraw(seed + 1 + key)
        d._timesteps = timesteps
        x = torch.randn((d.num_samples,) + tuple(d.latent_shape), generator=gen)
        with torch.no_grad():
            _, tpath = soft_rollout(d, x, None, keep_path=True)
        entry = (d, x, tpath)
        if teacher_pool is not None:
            pool[key] = entry
        return entry

    phases = {}   # seconds per phase of this call (router, candidates, step search, choice)
    tic = time.time()
    bar = tqdm(range(iterations), desc="learning schedule", disable=not progress)
    for it in bar:
        d, x, tpath = batch(it)
        hard = it >= iterations * (1.0 - hard_fraction)
        mask = None
        if hard:
            mask = _budget_mask(_pinned(torch.sigmoid(logits.detach()), fixed), cost, hard_budget)
            if calib is not None:
                _consider(scal, mask, sseen, sbest, screen)
        scale = tpath[-1].pow(2).mean().clamp_min(1e-8)
        opt.zero_grad(set_to_none=True)
        if training == "trajectory":
            w = _pinned(torch.sigmoid(logits), fixed)
            if hard:
                w = mask + w - w.detach()  # straight-through: hard forward, sigmoid gradient
            student, spath = soft_rollout(d, x, torch.cat([ones, w]), keep_path=True, forecast=train_forecast,
                                          branches=asked)
            final = (student - tpath[-1]).pow(2).mean() / scale
            traj = torch.stack([(a - b).pow(2).mean() for a, b in zip(spath, tpath)]).mean() / scale
            keep = (w * cost).sum() / cost.sum()
            loss = final + trajectory_weight * traj + (0.0 if hard else lam * keep)
            loss.backward()
            final_v, loss_v, keep_v = final.item(), loss.item(), keep.item()
        else:
            final_v, loss_v, keep_v = _stepwise_iteration(d, x, tpath, logits, mask, cost, lam, hard, scale,
                                                          trajectory_weight, train_forecast, asked, fixed)
        opt.step()
        with torch.no_grad():
            logits.clamp_(-5, 5)
            # dual ascent on the penalty: push the soft compute fraction towards 1 - budget
            lam = (lam * torch.exp(torch.tensor(2.0 * (keep_v - target_keep)))).clamp(1e-5, 10.0)
        if it % log_every == 0 or it == iterations - 1:
            h = dict(iteration=it, hard=bool(hard), loss=round(loss_v, 6), final_mse=round(final_v, 6),
                     keep=round(keep_v, 4), lam=round(lam.item(), 6))
            if hard and calib is not None:
                h["calibration_error_best"] = sbest.err
            hist.append(h)
        bar.set_postfix(final=f"{final_v:.2e}", keep=f"{keep_v:.2f}")
    phases["router"], tic = time.time() - tic, time.time()
    shared["router_logits"] = logits.detach().clone()
    scores = torch.cat([torch.ones((1, nb, len(branches))), _pinned(torch.sigmoid(logits.detach()), fixed).cpu()])
    if calib is not None and hard_fraction > 0:  # the schedule the final scores rank to is a candidate too
        mask = _budget_mask(scores[1:].to(device), cost, hard_budget)
        _consider(scal, mask, sseen, sbest, screen)
    if calib is not None and hard_fraction > 0 and structured_candidates:
        # step-structured masks are screened with the Taylor forecast too: on them it is often the best way
        # and the linear error alone would not rank them for it (flux-digits: bench/NOTES.md)
        sscreen = screen if screen is None or "taylor" not in forecasts else screen + ("taylor",)
        for mask in _structured_masks(model, timesteps, scores[1:].to(device), cost, hard_budget, warm_up=warm):
            _consider(scal, mask, sseen, sbest, sscreen)
    phases["candidates"], tic = time.time() - tic, time.time()
    costs, step_sets = None, []

    def set_mask(st):   # a step set as the learner's mask, on the model's device
        return step_mask(n, st, nb, len(branches)).to(device)

    if calib is not None and hard_fraction > 0 and step_search:
        mi = max_interval if max_interval is not None else default_max_interval(n, shared.get("budgets", [budget]))
        ckey = ("segment_costs", mi)
        if ckey not in shared:
            shared[ckey] = measure_segment_costs(scal, mi, progress=progress)
        costs = shared[ckey]
        pairs = step_candidate_pairs(costs, budget, warm_up=step_warm, top=step_top)
        if warm > 1 and not step_warm:   # the best under the router's warm-up as well: measurement decides
            pairs += step_candidate_pairs(costs, budget, warm_up=warm, top=1)
        for st, fc in pairs:   # each with its table's forecast; the best masks get every way in the confirmation
            _consider(scal, set_mask(st), sseen, sbest, _ways(fc, forecasts, screen))
            if st not in step_sets:
                step_sets.append(st)
        if step_sets and step_refine > 0:
            keys = {_mask_key(set_mask(st)): st for st in step_sets}
            _, k0, f0 = min((e, k, f) for (k, f), e in sseen.items() if k in keys)
            found = local_step_search(scal, keys[k0], f0, sseen, sbest, step_refine, warm_up=step_warm,
                                      every_way=screen is None)
            if found not in step_sets:
                step_sets.append(found)
    phases["step_search"], tic = time.time() - tic, time.time()
    if calib is not None and screen is not None:
        _confirm_screened(calib, seen, best, screen_top, screened=(sseen, sbest),
                          screen_calib=None if scal is calib else scal,
                          always=tuple(_mask_key(set_mask(st)) for st in step_sets))
    okey, picks = None, []   # the static searchers' picks on the calibration batch, (mask key, forecast), best first
    if best.mask is not None and costs is not None:
        # the static searchers' picks on the same costs, measured on the calibration batch; the best of them stays
        # unless the pick beats it beyond the noise of the samples measured
        searched = []
        for name, (fc, _, _) in SEARCHERS.items():
            try:
                st = searcher_steps(costs, budget, name, warm_up=step_warm)
            except ValueError:   # no set of segments this long reaches the end at this budget
                continue
            m = set_mask(st)
            ways, key = _ways(fc, forecasts, screen), _mask_key(m)
            _consider(calib, m, seen, best, ways)
            searched.append(min((seen[(key, f)], key, f) for f in (ways or forecasts)))
        okey = min(searched)[1:] if searched else None
        picks = [e[1:] for e in sorted(searched)]
    if best.mask is not None and choice_samples > len(calib.noise):   # race the finalists on new samples
        entries = finalists(seen, choice_top, also=picks)
        winner, logs = race({e: calib.logs[e] for e in entries}, extra_batch, measure_on(best), choice_samples)
        left = [e for e in picks if e in logs]   # the searchers' picks still in the race: the best of them on every
        okey = min(left, key=lambda e: error_from_logs(logs[e])) if left else None   # sample stays unless beaten
        if okey is not None and winner != okey and not logs_better(logs[winner], logs[okey]):
            winner = okey
        hist.append(dict(choice_samples=len(logs[winner]), finalists=len(entries), left=len(logs),
                         choice_error=error_from_logs(logs[winner]), kept_searcher_pick=winner == okey))
        best.mask, best.err, best.forecast = best.masks[winner[0]], seen[winner], winner[1]
    elif okey is not None:
        bkey = (_mask_key(best.mask), best.forecast)
        if bkey != okey and not significantly_better(calib, bkey, okey):
            hist.append(dict(kept_searcher_pick=True, pick_error=best.err, searcher_error=seen[okey]))
            best.mask, best.err, best.forecast = best.masks[okey[0]], seen[okey], okey[1]
    if best.mask is not None and refine_evaluations > 0:
        best.mask, best.err, refine_hist = _refine_mask(calib, best.mask, best.err, ones, refine_evaluations,
                                                         best.forecast, train_forecast, fixed_rows=fixed)
        hist.append(dict(refined=True, evaluations=len(refine_hist), calibration_error_best=best.err))
    phases["choice"] = time.time() - tic
    hist.append(dict(phase_seconds={k: round(v, 1) for k, v in phases.items()}))
    info = dict(den.info)
    if "true_cfg_scale" not in info:  # FluxPipeline's true CFG keeps its guidance embedding's scale apart
        info["guidance_scale"] = den.cfg
    info.setdefault("sampler", sampler_info(den.make_scheduler()))  # what the schedule's timesteps come from
    res = RouterResult(scores=scores, timesteps=timesteps, history=hist, seconds=time.time() - t0,
                       forecast=train_forecast, branch_flops=flops, denoiser_info=info, units=units, warm_up=warm,
                       segment_costs=costs, step_sets=step_sets)
    if best.mask is not None:
        res.mask = torch.cat([torch.ones((1, nb, len(branches))), best.mask.cpu()]).bool()
        res.forecast = best.forecast
        res.calibration_error = best.err
        res.candidates = len({key for key, _ in sseen})  # distinct masks (each measured per forecast mode)
    return res


def _ways(forecast: str, forecasts: tuple, screen) -> tuple | None:
    """The forecasts a searched set is measured with: its own, where the caller allows it (``forecasts``), else every
    allowed one; every allowed one (None) without screening."""
    if screen is None:
        return None
    return (forecast,) if forecast in forecasts else tuple(forecasts)


def _warm_up(warm_up, n: int, budget: float, flow: bool) -> int:
    """The number of first steps every schedule computes (``train_router``'s ``warm_up``; ``flow``: the sampler
    is a flow-matching one), checked against the step count and the budget (with ``w`` steps computed at most
    ``(n - w) / n`` of the work can go; ``"auto"`` takes fewer steps where the budget needs them)."""
    if warm_up == "auto":
        return min(warm_up_steps(n), int(n * (1.0 - budget) + 1e-9)) if flow else 0
    if isinstance(warm_up, bool) or not isinstance(warm_up, int) or not 0 <= warm_up < n:
        raise ValueError(f"warm_up must be 'auto' or an integer in [0, {n - 1}] (the steps computed in full "
                         f"at the start, of {n}), got {warm_up!r}")
    if budget > (n - warm_up) / n + 1e-9:
        raise ValueError(f"budget {budget:g} cannot be removed when the first {warm_up} of {n} steps are "
                         f"computed in full (at most {(n - warm_up) / n:.3f}): lower warm_up or the budget")
    return warm_up


def _pinned(scores: torch.Tensor, rows: int) -> torch.Tensor:
    """``scores`` ``[steps-1, ...]`` with its first ``rows`` rows (warm-up steps) set to 1: always computed."""
    if rows <= 0:
        return scores
    return torch.cat([torch.ones_like(scores[:rows]), scores[rows:]])


def _stepwise_iteration(den: Denoiser, x, tpath, logits, mask, cost, lam, hard: bool, scale, trajectory_weight,
                        forecast, branches=None, fixed: int = 0) -> tuple:
    """One step-wise training pass (gradients accumulate into ``logits.grad``): the loss after step s is
    ``(trajectory_weight / n + [s = last]) * MSE(x_s, teacher_s) / scale`` plus, in the soft phase, step
    s's share of the FLOPs penalty. Returns (final error, loss, soft compute fraction)."""
    n = len(tpath)
    total = cost.sum()
    acc = dict(final=0.0, loss=0.0, keep=0.0)
    keep_parts = []

    def weights(s):
        if s == 0:
            return None
        w = torch.sigmoid(logits[s - 1]) if s > fixed else torch.ones_like(logits[s - 1])
        if hard:
            w = mask[s - 1] + w - w.detach()
        keep_parts.append(w)
        return w

    def step_loss(s, x_next):
        err = (x_next - tpath[s]).pow(2).mean() / scale
        loss = (trajectory_weight / n + (1.0 if s == n - 1 else 0.0)) * err
        if s > 0:
            w = keep_parts[-1]
            keep_s = (w * cost[s - 1]).sum() / total
            acc["keep"] += float(keep_s.detach())
            if not hard:
                loss = loss + lam * keep_s
        acc["loss"] += float(loss.detach())
        if s == n - 1:
            acc["final"] = float(err.detach())
        keep_parts.clear()
        return loss

    stepwise_rollout(den, x, weights, step_loss, forecast, branches=branches)
    return acc["final"], acc["loss"], acc["keep"]


def schedule_from_scores(model, timesteps, scores: torch.Tensor, *, budget: float | None = None,
                         threshold: float | None = None, method: str = "learned", params: dict | None = None,
                         attn2_cache: str = "per_sample", forecast: str = "none",
                         branch_flops: dict | None = None, units=None) -> Schedule:
    """A static schedule from router scores: at a FLOPs ``budget`` (remove the lowest-scored branches
    until that fraction of branch FLOPs is removed) or at a ``threshold`` (compute where score > threshold).
    Step 0 always computes everything. ``branch_flops`` (default: the adapter's count at the model's
    default size) weighs the branches, e.g. at the real image and text token counts. ``units``
    (``RouterResult.units``, :func:`~l2c_kernels.learn.units.learning_units`) gives the router's columns
    and each unit's own cost instead (SD3 / Flux, either level)."""
    if (budget is None) == (threshold is None):
        raise ValueError("give exactly one of budget= or threshold=")
    ad = adapter_for(model)
    branches = ad.branches(model) if units is None else list(units.names)
    flops = dict(branch_flops) if branch_flops else (ad.branch_flops(model) if units is None else units.branch_flops)
    n, nb, nbr = scores.shape
    nblocks = ad.num_blocks(model) if units is None else units.num_blocks
    if (nb, nbr) != (nblocks, len(branches)) or n != len(timesteps):
        raise ValueError(f"scores have shape {tuple(scores.shape)}; expected ({len(timesteps)}, "
                         f"{nblocks}, {len(branches)}) for this model and step count")
    compute = torch.ones_like(scores, dtype=torch.bool)
    if threshold is not None:
        compute[1:] = scores[1:] > threshold
    else:
        if not 0.0 < budget < 1.0:
            raise ValueError(f"budget is the fraction of branch FLOPs to remove and must be in (0, 1), got {budget}")
        if units is None:
            w = torch.tensor([float(flops[b]) for b in branches])
            total = float(w.sum()) * n * nb
            wflat = w.repeat(n - 1, nb, 1).reshape(-1)
        else:  # each (block, unit) its own cost
            total = float(units.cost.double().sum()) * n
            wflat = units.cost.repeat(n - 1, 1, 1).reshape(-1)
        order = torch.argsort(scores[1:].reshape(-1), stable=True)
        removed = 0.0
        flat = compute[1:].reshape(-1).clone()
        for idx in order.tolist():
            if removed / total >= budget - 1e-9:
                break
            flat[idx] = False
            removed += float(wflat[idx])
        compute[1:] = flat.reshape(n - 1, nb, nbr)
    plan = [["".join(COMPUTE if c else REUSE for c in blk) for blk in row] for row in compute.tolist()]
    p = dict(params or {})
    p.update(budget=budget, threshold=threshold)
    if units is not None and units.schedule_kwargs:  # SD3 / Flux: the level and the per-unit costs
        s = Schedule.from_mask(model, list(timesteps), compute.tolist(), method=method, params=p,
                               attn2_cache=attn2_cache, forecast=forecast, **units.schedule_kwargs)
        s.branch_flops = dict(flops)
        return s
    return Schedule(timesteps=list(timesteps), plan=plan, branches=branches, num_blocks=nb,
                    model_class=type(getattr(model, "original_model", model)).__name__, method=method,
                    params=p, branch_flops=flops, attn2_cache=attn2_cache, forecast=forecast)
