"""One object for how a schedule is learned: :class:`LearnConfig`, as ``learn_schedule(model, config)``.

Its fields are the learner's options (:func:`~l2c_kernels.learn.router.train_router`'s keyword arguments: the
iterations, batches, calibration and search settings), read from that function's signature so the defaults live in
one place, plus what to learn: ``num_inference_steps``, ``budget`` (or ``budgets`` / ``speedups`` for a front,
``step_cost`` for the speed targets, ``speed_check`` the timed rounds that check a front's speeds, ``threshold``
instead of a budget). What to sample (labels, prompts, size,
guidance, scheduler, conditions) stays with the call::

    cfg = LearnConfig(num_inference_steps=50, budgets=(0.35, 0.5), calibration_samples=32)
    front = learn_schedule(pipe, cfg, prompts=my_prompts)
"""
from __future__ import annotations

import dataclasses
import inspect

from .router import train_router

#: what a call samples: passed to ``learn_schedule`` beside the config, never part of it
REQUEST = ("labels", "prompts", "height", "width", "guidance_scale", "cfg", "scheduler", "conditions", "latent_shape",
           "max_sequence_length", "true_cfg_scale", "negative_prompt", "cond_first", "model_timestep")
#: what a learning call is for, beside train_router's options: budget (train_router's), a front, a threshold
_TARGETS = [("budgets", "tuple | None", None), ("speedups", "tuple | None", None), ("step_cost", "object", None),
            ("speed_check", "int", 0), ("threshold", "float | None", None)]
#: the fields of a config that are not train_router's options
TARGETS = tuple(n for n, _, _ in _TARGETS)


def _fields() -> list:
    out = []
    for name, p in inspect.signature(train_router).parameters.items():
        if name in ("obj", "shared") or name in REQUEST:
            continue
        out.append((name, p.annotation if isinstance(p.annotation, str) else "object", dataclasses.field(
            default=p.default)))
    return out + [(n, t, dataclasses.field(default=d)) for n, t, d in _TARGETS]


LearnConfig = dataclasses.make_dataclass("LearnConfig", _fields(), frozen=True)
LearnConfig.__module__ = __name__
LearnConfig.__doc__ = ("How a schedule is learned (``learn_schedule(model, config)``): the fields are "
                       "``train_router``'s options with its defaults, and " + ", ".join(TARGETS)
                       + ". ``LearnConfig(...).options()`` gives them as keyword arguments.")
LearnConfig.options = lambda self: {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def make_config(steps_or_config, budget, options: dict):
    """The config of a ``learn_schedule`` call: the one it was given (then nothing else may set its fields), or one
    made from ``num_inference_steps``, ``budget`` and the keyword options."""
    names = [f.name for f in dataclasses.fields(LearnConfig)]
    unknown = sorted(k for k in options if k not in names)
    if unknown:
        raise TypeError(f"unknown learning option {', '.join(unknown)}: a LearnConfig has {', '.join(names)} "
                        f"(and what to sample: {', '.join(REQUEST)})")
    if isinstance(steps_or_config, LearnConfig):
        given = sorted(options) + (["budget"] if budget is not None else [])
        if given:
            raise TypeError(f"{', '.join(given)} given beside a LearnConfig: set them in the config "
                            f"(dataclasses.replace(config, ...))")
        return steps_or_config
    return LearnConfig(num_inference_steps=steps_or_config, **({} if budget is None else dict(budget=budget)),
                       **options)
