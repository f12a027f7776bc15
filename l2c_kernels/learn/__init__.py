"""Learning static cache schedules (L2C router) and the measurements baselines need."""
from .router import RouterResult, learn_schedule, schedule_from_scores, train_router

__all__ = ["learn_schedule", "train_router", "schedule_from_scores", "RouterResult"]
