"""``forecast_store_``: ``x += gate[:, None, :] * y``; ``diff2 <- diff``; ``diff <- y - cache``;
``cache <- y``, one pass.

Kernel over a 2-D grid like ``gated_residual_``. float32 arithmetic with one rounding per stored
element; ``cache`` and ``diff2`` receive bit copies. Registered as ``torch.ops.l2c_triton.forecast_store_``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._tiles import NUM_WARPS, device_guard, row_tile


@triton.jit
def _forecast_store_kernel(x_ptr, y_ptr, gate_ptr, cache_ptr, diff_ptr, diff2_ptr, n_rows, N, C,
                           HAS_GATE: tl.constexpr, HAS_DIFF2: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < C)[None, :]
    offs = rows[:, None] * C + cols[None, :]
    y = tl.load(y_ptr + offs, mask=mask, other=0.0)
    old = tl.load(cache_ptr + offs, mask=mask, other=0.0)
    if HAS_DIFF2:
        tl.store(diff2_ptr + offs, tl.load(diff_ptr + offs, mask=mask, other=0.0), mask=mask)
    yf = y.to(tl.float32)
    tl.store(diff_ptr + offs, (yf - old.to(tl.float32)).to(diff_ptr.dtype.element_ty), mask=mask)
    tl.store(cache_ptr + offs, y, mask=mask)
    if HAS_GATE:
        g_offs = (rows // N)[:, None] * C + cols[None, :]
        yf = yf * tl.load(gate_ptr + g_offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + yf
    tl.store(x_ptr + offs, x.to(x_ptr.dtype.element_ty), mask=mask)


def forecast_store_(x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor], cache: torch.Tensor,
                    diff: torch.Tensor, diff2: Optional[torch.Tensor]) -> None:
    """Launch on validated, contiguous arguments (see :func:`l2c_kernels.ops.forecast_store_`)."""
    B, N, C = x.shape
    n_rows = B * N
    if n_rows == 0 or C == 0:
        return
    block_r, block_c = row_tile(C, n_rows, x.dtype)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(C, block_c))
    with device_guard(x):
        _forecast_store_kernel[grid](
            x, y, gate if gate is not None else y, cache, diff, diff2 if diff2 is not None else diff,
            n_rows, N, C, HAS_GATE=gate is not None, HAS_DIFF2=diff2 is not None,
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=NUM_WARPS)


@torch.library.custom_op("l2c_triton::forecast_store_", mutates_args=("x", "cache", "diff", "diff2"))
def _op(x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor], cache: torch.Tensor, diff: torch.Tensor,
        diff2: Optional[torch.Tensor]) -> None:
    forecast_store_(x, y, gate, cache, diff, diff2)


@_op.register_fake
def _(x, y, gate, cache, diff, diff2) -> None:
    return None
