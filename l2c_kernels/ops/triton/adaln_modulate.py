"""``adaln_modulate``: ``LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]`` into a new tensor.

One program normalises ``BLOCK_R`` whole rows (``BLOCK_C = next_power_of_2(C)``, several rows per
program for narrow ``C``): the row stays in registers, mean and biased variance in float32 in two
passes over the registers, ``eps`` inside the square root. Registered as
``torch.ops.l2c_triton.adaln_modulate``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import device_guard

#: Widest row one program holds (elements).
MAX_BLOCK_C = 65536


@triton.jit
def _adaln_modulate_kernel(x_ptr, shift_ptr, scale_ptr, out_ptr, n_rows, N, C, eps,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    cmask = (cols < C)[None, :]
    mask = (rows < n_rows)[:, None] & cmask
    offs = rows[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    d = tl.where(cmask, x - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    v_offs = (rows // N)[:, None] * C + cols[None, :]
    shift = tl.load(shift_ptr + v_offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + v_offs, mask=mask, other=0.0).to(tl.float32)
    y = d * rstd[:, None] * (1.0 + scale) + shift
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _config(C: int, n_rows: int) -> tuple[int, int, int]:
    block_c = triton.next_power_of_2(C)
    if block_c > MAX_BLOCK_C:
        raise ValueError(f"l2c_kernels.ops.adaln_modulate: the Triton kernel holds rows of up to {MAX_BLOCK_C} "
                         f"elements, got C={C}; use another backend")
    block_r = max(1, min(triton.next_power_of_2(max(n_rows, 1)), 2048 // block_c))
    num_warps = min(16, max(1, block_r * block_c // 256))
    return block_r, block_c, num_warps


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Launch on validated, contiguous arguments (see :func:`l2c_kernels.ops.adaln_modulate`)."""
    B, N, C = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    n_rows = B * N
    if n_rows == 0 or C == 0:
        return out
    block_r, block_c, num_warps = _config(C, n_rows)
    with device_guard(x):
        _adaln_modulate_kernel[(triton.cdiv(n_rows, block_r),)](
            x, shift, scale, out, n_rows, N, C, eps, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
    return out


@torch.library.custom_op("l2c_triton::adaln_modulate", mutates_args=())
def _op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return adaln_modulate(x, shift, scale, eps)


@_op.register_fake
def _(x, shift, scale, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)
