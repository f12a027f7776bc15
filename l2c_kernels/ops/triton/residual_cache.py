"""``residual_delta_store_`` (``cache <- out - inp``) and ``residual_apply_`` (``out <- inp + cache``).

Flat elementwise kernels over the contiguous tensors (any shape), ``BLOCK`` elements (8 KiB) per
program, float32 arithmetic. The destination may be the very same tensor as a source.
Registered as ``torch.ops.l2c_triton.residual_delta_store_`` and ``torch.ops.l2c_triton.residual_apply_``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import NUM_WARPS, device_guard, flat_block


@triton.jit
def _residual_kernel(dst_ptr, a_ptr, b_ptr, numel, SUBTRACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = a - b if SUBTRACT else a + b
    tl.store(dst_ptr + offs, r.to(dst_ptr.dtype.element_ty), mask=mask)


def _launch(dst: torch.Tensor, a: torch.Tensor, b: torch.Tensor, subtract: bool) -> None:
    numel = dst.numel()
    if numel == 0:
        return
    block = flat_block(dst.dtype)
    with device_guard(dst):
        _residual_kernel[(triton.cdiv(numel, block),)](dst, a, b, numel, SUBTRACT=subtract, BLOCK=block,
                                                       num_warps=NUM_WARPS)


def residual_delta_store_(cache: torch.Tensor, out: torch.Tensor, inp: torch.Tensor) -> None:
    """Launch on validated, contiguous arguments (see :func:`l2c_kernels.ops.residual_delta_store_`)."""
    _launch(cache, out, inp, subtract=True)


def residual_apply_(out: torch.Tensor, inp: torch.Tensor, cache: torch.Tensor) -> None:
    """Launch on validated, contiguous arguments (see :func:`l2c_kernels.ops.residual_apply_`)."""
    _launch(out, inp, cache, subtract=False)


@torch.library.custom_op("l2c_triton::residual_delta_store_", mutates_args=("cache",))
def _delta_op(cache: torch.Tensor, out: torch.Tensor, inp: torch.Tensor) -> None:
    residual_delta_store_(cache, out, inp)


@_delta_op.register_fake
def _(cache, out, inp) -> None:
    return None


@torch.library.custom_op("l2c_triton::residual_apply_", mutates_args=("out",))
def _apply_op(out: torch.Tensor, inp: torch.Tensor, cache: torch.Tensor) -> None:
    residual_apply_(out, inp, cache)


@_apply_op.register_fake
def _(out, inp, cache) -> None:
    return None
