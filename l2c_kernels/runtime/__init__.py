"""Running static schedules: plans, caches, CUDA graphs and the drop-in module."""
from .cached_transformer import CachedTransformer, compile_schedule
from .plan import BlockPlan, StepPlan, compile_plans

__all__ = ["CachedTransformer", "compile_schedule", "BlockPlan", "StepPlan", "compile_plans"]
