"""Learning static cache schedules (L2C router) and the measurements baselines need.

Entry point: :func:`learn_schedule` (a pipeline, a bundled model, or a transformer with its own
conditioning); on SD3 / Flux, ``branches=branch_names(model)`` learns a branch-level schedule (joint attention,
``ff``, ``ff_context``, the single blocks' halves; ``soft_forward.py``) instead of the default block level.
Supporting another pipeline: :func:`register_pipeline` (``conditioning.py``); another soft forward (e.g.
block-level): :func:`register_soft_forward` (``soft_forward.py``).
"""
from ..sampling.conditioning import Request, denoiser_for, register_model_names, register_pipeline
from ..sampling.denoiser import Denoiser
from .config import LearnConfig
from .entry import learn_front, learn_schedule
from .router import RouterResult, schedule_from_scores, train_router
from .soft_forward import register_soft_forward

__all__ = ["learn_schedule", "learn_front", "LearnConfig", "train_router", "schedule_from_scores", "RouterResult", "Denoiser", "denoiser_for",
           "register_pipeline", "register_model_names", "register_soft_forward", "Request"]
