"""Many devices: AsyncDiff (asynchronous denoising), one transformer component per process.

    from l2c_kernels import parallel
    pipe.transformer = parallel.AsyncDenoiser(pipe.transformer, num_components=2, stride=1, warm_up=3)

Launch with ``torchrun --nproc_per_node=N`` (N = num_components + stride - 1); every rank runs
the same script with the same seed and gets the same images. See :class:`AsyncDenoiser`.
"""
from .async_denoiser import AsyncDenoiser
from .comm import AsyncDiffError, ConfigMismatchError
from .partition import Split, balanced_split, example_inputs, measure_block_costs, uniform_split
from .streams import BlockStreams, UnsplittableModelError

__all__ = ["AsyncDenoiser", "AsyncDiffError", "ConfigMismatchError", "UnsplittableModelError", "BlockStreams", "Split",
           "balanced_split", "uniform_split", "measure_block_costs", "example_inputs"]
