"""One-line use on a diffusers pipeline: ``l2c.enable(pipe, schedule)``, ``l2c.summary(pipe)``, ``l2c.disable(pipe)``.

``enable`` puts the ``compile_schedule`` module in ``pipe.transformer`` and wraps one method of the
pipeline's scheduler, ``set_timesteps``, which every diffusers pipeline calls once at the start of a
generation: that is where a new generation is detected (the module is reset) and where the number of
steps the pipeline samples is compared with the schedule's. ``disable`` puts the original transformer
back and removes the wrapper; nothing else is touched.
"""
from __future__ import annotations

import functools

from ..schedule import Schedule, ScheduleError

# pipelines that batch classifier-free guidance as torch.cat([latents] * 2) with one timestep for both
# halves: their halves are identical by construction, so CFG collapse needs no run-time comparison
_CFG_BATCHED_PIPELINES = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")


def resample_schedule(schedule: Schedule, timesteps) -> Schedule:
    """``schedule`` (made for N steps) stretched over ``timesteps`` (M steps) in normalised time: step j of M
    follows step ``round(j * (N - 1) / (M - 1))`` of the original plan. Step 0 maps to step 0 (which computes
    everything), so every reuse still reads a cache an earlier step filled; forecasts are re-derived for
    the new step positions when the schedule is compiled."""
    ts = [float(t) for t in timesteps]
    n, m = schedule.num_steps, len(ts)
    if m < 1:
        raise ScheduleError("cannot resample a schedule to zero steps")
    src = [0] if m == 1 else [round(j * (n - 1) / (m - 1)) for j in range(m)]
    d = schedule.to_dict()
    d.update(timesteps=[int(t) if t.is_integer() else t for t in ts], plan=[list(schedule.plan[i]) for i in src],
             params=dict(schedule.params, resampled_from_steps=n))
    return Schedule.from_dict(d)


class _Enabled:
    """What ``enable`` changed on one pipeline, and the modules it made (one per step count sampled)."""

    def __init__(self, pipe, schedule: Schedule, resample: bool, options: dict):
        from .cached_transformer import compile_schedule

        self.pipe, self.schedule, self.resample, self.options = pipe, schedule, resample, options
        self.original = pipe.transformer
        self.scheduler = pipe.scheduler
        self.modules: dict[int, object] = {}
        self._compile = compile_schedule
        self._wrapped = self.scheduler.set_timesteps

    def module_for(self, steps: int):
        mod = self.modules.get(steps)
        if mod is None:
            if steps == self.schedule.num_steps:
                sched = self.schedule
            elif self.resample:
                sched = resample_schedule(self.schedule, self._scheduler_timesteps())
            else:
                raise ScheduleError(
                    f"this schedule was made for {self.schedule.num_steps} steps (timesteps {self.schedule.timesteps}) "
                    f"but the pipeline samples {steps}; make a schedule for {steps} steps, or pass resample=True to "
                    f"l2c.enable to stretch this one over normalised time (at some quality cost)")
            mod = self.modules[steps] = self._compile(self.original, sched, **self.options)
            mod._l2c_enabled = self
        return mod

    def _scheduler_timesteps(self) -> list[float]:
        return [float(t) for t in self.scheduler.timesteps.tolist()]  # once per generation, before any step

    def set_timesteps(self, *args, **kwargs):
        out = self._wrapped(*args, **kwargs)
        mod = self.module_for(len(self.scheduler.timesteps))
        mod.reset()
        self.pipe.transformer = mod
        return out


def _same_signature(fn, like):
    """``fn`` as a function that reports ``like``'s signature: pipelines inspect ``scheduler.set_timesteps`` (e.g.
    Flux checks that it takes ``sigmas``) before calling it."""
    def call(*args, **kwargs):
        return fn(*args, **kwargs)

    return functools.update_wrapper(call, like)


def _state(pipe) -> _Enabled | None:
    st = getattr(pipe.transformer, "_l2c_enabled", None)
    return st if isinstance(st, _Enabled) and st.pipe is pipe else None


def enable(pipe, schedule: Schedule, *, resample: bool = False, **options):
    """Run ``pipe`` with ``schedule``: ``pipe.transformer`` becomes ``compile_schedule(transformer, schedule,
    **options)``; returns that module. A pipeline call with another number of steps raises a clear
    :class:`ScheduleError` before any step, unless ``resample=True`` (then the schedule is stretched over
    normalised time, see :func:`resample_schedule`). Calling ``enable`` again replaces the schedule."""
    if not hasattr(pipe, "transformer") or not hasattr(pipe, "scheduler"):
        raise TypeError(f"enable() takes a diffusers pipeline with a transformer and a scheduler, got {type(pipe).__name__}")
    if _state(pipe) is not None:
        disable(pipe)
    if type(pipe).__name__ in _CFG_BATCHED_PIPELINES:
        options.setdefault("cfg_collapse", "assume")
    st = _Enabled(pipe, schedule, resample, options)
    mod = st.module_for(schedule.num_steps)
    pipe.transformer = mod
    st.scheduler.set_timesteps = st.patched = _same_signature(st.set_timesteps, st._wrapped)
    return mod


def disable(pipe):
    """Undo :func:`enable`: the original transformer back in ``pipe.transformer``, the scheduler unwrapped.
    Returns the original transformer."""
    st = _state(pipe)
    if st is None:
        raise ValueError("l2c is not enabled on this pipeline (l2c.enable(pipe, schedule) enables it)")
    if st.scheduler.__dict__.get("set_timesteps") is st.patched:
        del st.scheduler.set_timesteps
    pipe.transformer = st.original
    return st.original


def summary(pipe_or_module) -> dict:
    """What the cached transformer of ``pipe_or_module`` (a pipeline after :func:`enable`, or a
    ``compile_schedule`` module) has run: steps run, generations, branch FLOPs removed over the steps run,
    plans used, CFG-collapsed calls, CUDA graphs."""
    mod = getattr(pipe_or_module, "transformer", pipe_or_module)
    if not hasattr(mod, "original_model") or not hasattr(mod, "schedule"):
        raise ValueError(f"no l2c cached transformer here ({type(mod).__name__}); call l2c.enable(pipe, schedule) first")
    if hasattr(mod, "summary"):
        out = dict(mod.summary())
    else:  # a runtime without run-time counters: what its schedule says
        out = dict(schedule_steps=mod.schedule.num_steps, current_step=mod.current_step,
                   schedule_flops_removed=round(mod.schedule.flops_removed_fraction(), 4),
                   distinct_plans=mod.distinct_plans() if hasattr(mod, "distinct_plans") else None)
    st = getattr(mod, "_l2c_enabled", None)
    if isinstance(st, _Enabled):
        out["enabled_on"] = type(st.pipe).__name__
        out["step_counts_sampled"] = sorted(st.modules)
        out["resampled_from_steps"] = st.schedule.num_steps if mod.schedule is not st.schedule else None
    return out
