"""Running static schedules: plans, caches, CUDA graphs, the drop-in module and the one-line pipeline form."""
from .cached_transformer import CachedTransformer, compile_schedule
from .cuda_graphs import CudaGraphError
from .enable import disable, enable, resample_schedule, summary
from .plan import BlockPlan, StepPlan, compile_plans

__all__ = ["CachedTransformer", "compile_schedule", "CudaGraphError", "enable", "disable", "summary",
           "resample_schedule", "BlockPlan", "StepPlan", "compile_plans"]
