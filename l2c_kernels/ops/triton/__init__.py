"""Triton kernels of the fused ops, one module per op (kernel + launcher + ``torch.ops.l2c_triton`` op).

Importing this package defines the kernels and registers ``torch.ops.l2c_triton.*`` as torch
custom ops (opaque to ``torch.compile``, so graphs do not break at them). On CUDA tensors the
kernels run compiled; with ``TRITON_INTERPRET=1`` set before this import they run on CPU tensors
under the Triton interpreter instead (for testing; float32 only: the interpreter has no bfloat16
arithmetic). ``torch.library.triton_op`` is not used because its fake-tensor tracing cannot go
through interpreted kernels.

Use the ops through :mod:`l2c_kernels.ops` (``backend="triton"``), which validates the arguments;
the launchers here expect validated, contiguous tensors.
"""
from triton.runtime.jit import JITFunction as _JITFunction

from .. import _backend
from .adaln_modulate import adaln_modulate
from .cfg_mean_store import cfg_mean_store_
from .forecast_residual import forecast_residual_
from .gated_residual import _gated_residual_kernel, gated_residual_
from .residual_cache import residual_apply_, residual_delta_store_

#: True when the kernels were defined under the Triton interpreter (they then run on CPU tensors).
INTERPRETED = not isinstance(_gated_residual_kernel, _JITFunction)
_backend._facts["triton_interpreted"] = INTERPRETED

__all__ = ["gated_residual_", "cfg_mean_store_", "residual_delta_store_", "residual_apply_", "forecast_residual_",
           "adaln_modulate", "INTERPRETED"]
