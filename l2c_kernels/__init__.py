"""l2c_kernels: static cache schedules for diffusion transformers, run with fused kernels and CUDA graphs.

    import l2c_kernels as l2c
    sched = l2c.Schedule.load("dit.l2c.json")
    pipe.transformer = l2c.compile_schedule(pipe.transformer, sched)
"""
from .learn import LearnConfig, learn_front, learn_schedule
from .runtime import CachedTransformer, compile_schedule, disable, enable, summary
from .schedule import Schedule, ScheduleError
from . import models  # noqa: F401,E402  (the bundled digits models register themselves: a plug-in on top)

__version__ = "0.1.0"


def build_info() -> dict:
    """Which compiled backends this installation has (C++ CPU kernels, CUDA kernels, Triton)."""
    from ._build import build_info as _info

    return _info()


__all__ = ["learn_schedule", "learn_front", "LearnConfig", "Schedule", "ScheduleError", "compile_schedule", "CachedTransformer", "enable", "disable", "summary", "build_info", "__version__"]
