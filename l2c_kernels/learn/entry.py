"""The learner's entry: :func:`learn_schedule` (one budget, or a front) and :func:`learn_front`, over a
:class:`~l2c_kernels.learn.config.LearnConfig` and what the call samples."""
from __future__ import annotations

import dataclasses

import torch

from ..schedule import Schedule
from ..sampling.conditioning import denoiser_for, load_named
from .config import REQUEST, TARGETS, LearnConfig, make_config
from .router import DEFAULT_ITERATIONS, RouterResult, schedule_from_scores, train_router

#: the budgets :func:`learn_front` learns when given none
DEFAULT_BUDGETS = (0.35, 0.5, 0.67, 0.75)


def learn_front(obj, num_inference_steps: int | LearnConfig = 20, budgets=None, shared: dict | None = None,
                **kwargs) -> list:
    """Schedules for several ``budgets`` in one call (:func:`learn_schedule`'s arguments otherwise), smallest
    budget first. The budgets share the calibration and screening batches with their full-compute references, the
    teacher trajectories and the segment costs of the step-level search (measured once, for the longest
    segments the largest budget needs).

    The router of each budget after the first starts from the one before it (smallest budget first) and trains a
    third of the iterations.

    The front is monotone on the calibration batch: where a larger budget's schedule scores better there than a
    smaller budget's, the smaller budget takes it (it removes more than asked; ``params["front_from_budget"]``
    says so), so a smaller budget never scores below a larger one. ``shared``: a dict to keep those measurements in
    (the segment costs under ``("segment_costs", max_interval)``), e.g. to run the static searchers on them.

    ``speedups`` (e.g. ``[1.5, 2, 3, 4]``, instead of ``budgets``): learn at the budgets that run that many times
    faster than full compute on this device (:mod:`~l2c_kernels.learn.speed`): what a reused and a computed step
    cost under a schedule over a plain step (``step_cost``: a :class:`~l2c_kernels.learn.speed.StepCost`, or the
    reused step's cost alone; None: timed here on the model, batch and device the learner uses, pooled over the
    forecasts) turn each target into a budget before anything is learned; a target out of reach is refused then.
    Each schedule's ``params`` keep ``target_speedup``, ``step_cost`` and ``predicted_speedup``. Where the costs were
    timed here, ``speed_check`` rounds (default 0: off; ``bench/NOTES.md``, "Speed targets", says why) time every
    learned schedule against full compute (``params["measured_speedup"]``), refit the computed step's cost from those
    timings, and learn once more every target whose budget the refit moves by a computed step or more (one step's
    timing noise on a shared machine moves a budget by about that much)."""
    request = {k: kwargs.pop(k) for k in REQUEST if k in kwargs}
    if isinstance(obj, str):   # loaded once for every budget
        obj = load_named(obj)
    if budgets is not None:
        kwargs["budgets"] = budgets
    config = make_config(num_inference_steps, None, kwargs)
    steps, targets, step_cost, timing_den = config.num_inference_steps, None, config.step_cost, None
    if isinstance(config.speed_check, bool) or not isinstance(config.speed_check, int) or config.speed_check < 0:
        raise ValueError(f"speed_check is a number of timed rounds (0: no check), got {config.speed_check!r}")
    if config.speedups is not None:
        if config.budgets is not None:
            raise ValueError("give budgets= or speedups=, not both")
        from .speed import _cost, budgets_for_speedups, measure_step_costs, predicted_speedup

        targets = sorted({float(s) for s in config.speedups})
        if not targets:
            raise ValueError("speedups is empty: give at least one factor above 1")
        if step_cost is None:
            timing_den = _front_denoiser(obj, config, request)
            step_cost = measure_step_costs(timing_den, steps)["pooled"]
        step_cost = _cost(step_cost)
        budgets = budgets_for_speedups(targets, step_cost, steps)
    else:
        budgets = DEFAULT_BUDGETS if config.budgets is None else config.budgets
    bs = sorted({float(b) for b in budgets})
    if not bs:
        raise ValueError("budgets is empty: give at least one fraction of the work to remove")
    bad = [b for b in bs if not 0.0 < b < 1.0]
    if bad:
        raise ValueError(f"every budget is a fraction of the work to remove in (0, 1), got {bad}")
    if config.threshold is not None:
        raise ValueError("a front is learned at budgets, not at a threshold")
    shared = {} if shared is None else shared
    shared["budgets"] = bs
    one = dataclasses.replace(config, budgets=None, speedups=None, step_cost=None)
    learned = {}

    def learn_at(b: float) -> Schedule:   # each budget learned once (a budget placed again may come back)
        if b not in learned:
            if learned:   # later budgets start from the router of the one before, a third of the iterations
                shared["warm_iterations"] = max(2, int(config.iterations or DEFAULT_ITERATIONS) // 3)
            learned[b] = learn_schedule(obj, dataclasses.replace(one, budget=b), shared=shared, **request)
        return learned[b]

    out = _monotone([learn_at(b) for b in bs], bs)
    if targets is not None:
        for s, target in zip(out, targets):
            s.params.update(target_speedup=target, step_cost=step_cost.to_dict(),
                            predicted_speedup=round(predicted_speedup(s.flops_removed_fraction(), step_cost), 3))
        if timing_den is not None and config.speed_check:
            out = _check_speeds(out, bs, targets, step_cost, timing_den, steps, config.speed_check, learn_at)
    return out


def _monotone(front: list, bs: list) -> list:
    """The front with every budget's schedule replaced by a larger budget's where that one scores better on the
    calibration batch (``params["front_from_budget"]`` says so)."""
    out = list(front)
    for k in range(len(out) - 2, -1, -1):
        mine, larger = out[k].params.get("calibration_error_db"), out[k + 1].params.get("calibration_error_db")
        if mine is not None and larger is not None and larger < mine:
            s = Schedule.from_dict(out[k + 1].to_dict())
            s.params = dict(s.params, budget=bs[k], front_from_budget=out[k + 1].params.get("front_from_budget",
                                                                                          bs[k + 1]))
            out[k] = s
    return out


def _check_speeds(out: list, bs: list, targets: list, step_cost, den, steps: int, rounds: int, learn_at) -> list:
    """Time the front's schedules against full compute (``rounds`` interleaved rounds) and record
    ``measured_speedup``; learn again, once, every target whose budget the refit of the computed step's cost moves by
    a computed step or more (:func:`~l2c_kernels.learn.speed.check_front`; ``params["placed_again_from_budget"]``,
    ``params["step_cost"]`` the refitted cost), timing those again."""
    from .speed import check_front, measure_speedups, predicted_speedup

    check = check_front(out, bs, targets, step_cost, den, steps, rounds)
    for s, m in zip(out, check["measured"]):
        s.params["measured_speedup"] = round(m, 3)
    redo, refit = check["redo"], check["refit"]
    if not redo:
        return out
    new_bs = [check["budgets"][k] if k in redo else b for k, b in enumerate(bs)]
    order = sorted(range(len(new_bs)), key=lambda k: new_bs[k])   # moved budgets keep their targets' order
    again = _monotone([learn_at(new_bs[k]) if k in redo else out[k] for k in order], [new_bs[k] for k in order])
    again = [again[order.index(k)] for k in range(len(out))]
    changed = [k for k in range(len(out)) if again[k] is not out[k]]   # learned again, or a larger one's taken
    for k in changed:
        s = again[k] = Schedule.from_dict(again[k].to_dict())
        s.params.update(target_speedup=targets[k], step_cost=refit.to_dict(),
                        first_measured_speedup=out[k].params["measured_speedup"],
                        predicted_speedup=round(predicted_speedup(s.flops_removed_fraction(), refit), 3))
        if k in redo:
            s.params["placed_again_from_budget"] = bs[k]
    for k, m in zip(changed, measure_speedups(den, steps, [again[k] for k in changed], rounds)):
        again[k].params["measured_speedup"] = round(m, 3)
    return again


def _front_denoiser(obj, config: LearnConfig, request: dict):
    """The learner's training batch (its model, conditions, device) for timing a step, as :func:`train_router`
    builds it."""
    g = request.get("guidance_scale")
    rest = {k: v for k, v in request.items() if k not in ("guidance_scale", "cfg", "scheduler")}
    return denoiser_for(obj, config.batch_size, g if g is not None else request.get("cfg"), request.get("scheduler"),
                        seed=config.seed, **rest)


def learn_schedule(obj, num_inference_steps: int | LearnConfig = 20, budget: float | None = None, *, labels=None,
                   prompts=None, height: int | None = None, width: int | None = None,
                   guidance_scale: float | None = None, scheduler=None, conditions: dict | None = None,
                   latent_shape=None, cfg: float | None = None, max_sequence_length: int | None = None,
                   true_cfg_scale: float | None = None, negative_prompt=None, cond_first: bool = False,
                   model_timestep=None, shared: dict | None = None, **options):
    """Learn a static cache schedule that removes ``budget`` of the branch FLOPs (0 < budget < 1, default 0.4;
    exact to one branch). ``threshold`` instead keeps every branch whose score exceeds it. ``budgets`` (a list) learns
    a front instead and returns a list of schedules, smallest budget first (:func:`learn_front`); so does
    ``speedups`` (e.g. ``[1.5, 2, 3]``: the budgets that run that many times faster on this device, from
    ``step_cost`` or timed here).

    ``obj`` is one of:

    - a diffusers pipeline (``DiTPipeline``, ``PixArtAlphaPipeline``, ``PixArtSigmaPipeline``, and
      whatever is registered with :func:`~l2c_kernels.sampling.conditioning.register_pipeline`), with the
      user's ``labels`` (DiT; default: drawn from the model's classes) or ``prompts`` (PixArt:
      required), ``height`` / ``width`` in pixels (default: the model's size), ``guidance_scale``
      (default: the pipeline's) and ``scheduler`` (None: the pipeline's own; a name such as ``"ddim"``,
      ``"dpm++"``, ``"euler"``, ``"flow-euler"``, or a diffusers scheduler; refused if it does not fit);
    - a transformer, for users with their own sampling loop: ``scheduler`` (the diffusers scheduler
      the loop uses), ``conditions`` (the transformer's keyword arguments for one call on the whole
      batch: with guidance, the unconditional half first, or ``cond_first=True``), ``latent_shape`` (one sample's
      latents as the transformer takes them: ``(C, H, W)``, packed ``(tokens, C)`` for Flux, ``(C, F, H, W)`` for
      video) and ``model_timestep`` (what the loop passes the transformer for a scheduler timestep tensor ``t``,
      e.g. ``lambda t: t / 1000`` for Flux; None: ``t`` as it is);
    - a bundled model or its name (``"dit-digits"``).

    The model learns where it is (device and dtype of its weights; the router is float32).
    ``cfg`` is another name for ``guidance_scale``. The learning options (``iterations``, ``batch_size``, ``seed``,
    ``budgets``, ``speedups``, the calibration and search settings) are the fields of
    :class:`~l2c_kernels.learn.config.LearnConfig`: give them as keywords, or the config itself in place of
    ``num_inference_steps`` (``learn_schedule(pipe, LearnConfig(num_inference_steps=50, budget=0.5), prompts=...)``).
    """
    config = make_config(num_inference_steps, budget, options)
    request = dict(labels=labels, prompts=prompts, height=height, width=width, guidance_scale=guidance_scale,
                   scheduler=scheduler, conditions=conditions, latent_shape=latent_shape, cfg=cfg,
                   max_sequence_length=max_sequence_length, true_cfg_scale=true_cfg_scale,
                   negative_prompt=negative_prompt, cond_first=cond_first, model_timestep=model_timestep)
    if config.budgets is not None or config.speedups is not None:
        return learn_front(obj, config, shared=shared, **request)
    c = config
    if not 0.0 < c.budget < 1.0:
        raise ValueError(f"budget is the fraction of branch FLOPs to remove and must be in (0, 1), got {c.budget}")
    if isinstance(obj, str):
        obj = load_named(obj)
    train = {k: v for k, v in c.options().items() if k not in TARGETS}
    res = train_router(obj, shared=shared, **train, **request)
    model = obj if isinstance(obj, torch.nn.Module) else getattr(obj.transformer, "original_model", obj.transformer)
    sched_name = scheduler if isinstance(scheduler, str) or scheduler is None else type(scheduler).__name__
    params = dict(num_inference_steps=c.num_inference_steps, scheduler=sched_name, iterations=c.iterations,
                  batch_size=c.batch_size, seed=c.seed, warm_up=res.warm_up, train_seconds=round(res.seconds, 1),
                  history=res.history,
                  scores=[[[round(v, 4) for v in blk] for blk in row] for row in res.scores.tolist()])
    params["cfg"] = params["guidance_scale"] = _used_guidance(res, guidance_scale, cfg)
    params.update({k: res.denoiser_info[k] for k in ("true_cfg_scale", "negative_prompt") if k in res.denoiser_info})
    if height or width:
        params.update(height=height, width=width)
    sampler = dict(res.denoiser_info.get("sampler") or {})
    if c.threshold is not None:
        s = schedule_from_scores(model, res.timesteps, res.scores, threshold=c.threshold, params=params,
                                 forecast=res.forecast, branch_flops=res.branch_flops, units=res.units)
        s.sampler = sampler
        return s
    if res.mask is not None:  # the hard schedule with the lowest measured error on the calibration batch
        params.update(budget=c.budget, threshold=None, calibration_error_db=res.calibration_error,
                      candidates_measured=res.candidates)
        s = Schedule.from_mask(model, res.timesteps, res.mask, method="learned", params=params,
                               forecast=res.forecast, sampler=sampler,
                               **(res.units.schedule_kwargs if res.units is not None else {}))
        s.branch_flops = dict(res.branch_flops)
        return s
    s = schedule_from_scores(model, res.timesteps, res.scores, budget=c.budget, params=params,
                             forecast=res.forecast, branch_flops=res.branch_flops, units=res.units)
    s.sampler = sampler
    return s


def _used_guidance(res: RouterResult, guidance_scale, cfg):
    g = res.denoiser_info.get("guidance_scale")
    return g if g is not None else (guidance_scale if guidance_scale is not None else cfg)
