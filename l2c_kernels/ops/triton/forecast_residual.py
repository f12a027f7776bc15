"""``forecast_residual_``: ``x += gate[:, None, :] * (c0 * y0 + c1 * y1 + c2 * y2)``, one pass.

Kernel over a 2-D grid like ``gated_residual_``: axis 0 blocks of ``BLOCK_R`` rows of the
``[B*N, C]`` view, axis 1 blocks of ``BLOCK_C`` columns. The forecast is formed in float32 and
``x`` rounded once. Registered as ``torch.ops.l2c_triton.forecast_residual_``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._tiles import NUM_WARPS, device_guard, row_tile


@triton.jit
def _forecast_residual_kernel(x_ptr, y0_ptr, y1_ptr, y2_ptr, gate_ptr, c0, c1, c2, n_rows, N, C,
                              HAS_Y2: tl.constexpr, HAS_GATE: tl.constexpr,
                              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < C)[None, :]
    offs = rows[:, None] * C + cols[None, :]
    v = c0 * tl.load(y0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v += c1 * tl.load(y1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_Y2:
        v += c2 * tl.load(y2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        g_offs = (rows // N)[:, None] * C + cols[None, :]
        v *= tl.load(gate_ptr + g_offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + v
    tl.store(x_ptr + offs, x.to(x_ptr.dtype.element_ty), mask=mask)


def forecast_residual_(x: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, y2: Optional[torch.Tensor],
                       gate: Optional[torch.Tensor], c0: float, c1: float, c2: float) -> None:
    """Launch on validated, contiguous arguments (see :func:`l2c_kernels.ops.forecast_residual_`)."""
    B, N, C = x.shape
    n_rows = B * N
    if n_rows == 0 or C == 0:
        return
    block_r, block_c = row_tile(C, n_rows, x.dtype)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(C, block_c))
    with device_guard(x):
        _forecast_residual_kernel[grid](
            x, y0, y1, y2 if y2 is not None else y1, gate if gate is not None else y0,
            float(c0), float(c1), float(c2), n_rows, N, C, HAS_Y2=y2 is not None, HAS_GATE=gate is not None,
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=NUM_WARPS)


@torch.library.custom_op("l2c_triton::forecast_residual_", mutates_args=("x",))
def _op(x: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, y2: Optional[torch.Tensor],
        gate: Optional[torch.Tensor], c0: float, c1: float, c2: float) -> None:
    forecast_residual_(x, y0, y1, y2, gate, c0, c1, c2)


@_op.register_fake
def _(x, y0, y1, y2, gate, c0, c1, c2) -> None:
    return None
