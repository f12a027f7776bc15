"""``gated_residual_``: ``x += gate[:, None, :] * y`` (``x += y`` without gate), ``cache <- y``, one pass.

Kernel over a 2-D grid: axis 0 blocks of ``BLOCK_R`` rows of the ``[B*N, C]`` view, axis 1 blocks
of ``BLOCK_C`` columns. float32 arithmetic, one rounding per stored element; the cache is a bit
copy of ``y``. Registered as ``torch.ops.l2c_triton.gated_residual_``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._tiles import NUM_WARPS, device_guard, row_tile


@triton.jit
def _gated_residual_kernel(x_ptr, y_ptr, gate_ptr, cache_ptr, n_rows, N, C,
                           HAS_GATE: tl.constexpr, HAS_CACHE: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < C)[None, :]
    offs = rows[:, None] * C + cols[None, :]
    y = tl.load(y_ptr + offs, mask=mask, other=0.0)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_CACHE:
        tl.store(cache_ptr + offs, y, mask=mask)
    if HAS_GATE:
        g_offs = (rows // N)[:, None] * C + cols[None, :]
        g = tl.load(gate_ptr + g_offs, mask=mask, other=0.0).to(tl.float32)
        x = x + g * y.to(tl.float32)
    else:
        x = x + y.to(tl.float32)
    tl.store(x_ptr + offs, x.to(x_ptr.dtype.element_ty), mask=mask)


def gated_residual_(x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor] = None,
                    cache: Optional[torch.Tensor] = None) -> None:
    """Launch on validated, contiguous arguments (see :func:`l2c_kernels.ops.gated_residual_`)."""
    B, N, C = x.shape
    n_rows = B * N
    if n_rows == 0 or C == 0:
        return
    block_r, block_c = row_tile(C, n_rows, x.dtype)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(C, block_c))
    with device_guard(x):
        _gated_residual_kernel[grid](
            x, y, gate if gate is not None else y, cache if cache is not None else x, n_rows, N, C,
            HAS_GATE=gate is not None, HAS_CACHE=cache is not None,
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=NUM_WARPS)


@torch.library.custom_op("l2c_triton::gated_residual_", mutates_args=("x", "cache"))
def _op(x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor], cache: Optional[torch.Tensor]) -> None:
    gated_residual_(x, y, gate, cache)


@_op.register_fake
def _(x, y, gate, cache) -> None:
    return None
