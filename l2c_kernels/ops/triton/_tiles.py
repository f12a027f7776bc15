"""Block sizes and launch helpers shared by the Triton kernels."""
from __future__ import annotations

import contextlib

import torch
import triton

# Elements one program of an elementwise kernel handles: 8 KiB per operand, i.e. four 16-byte
# accesses per thread with 4 warps.
_TILE_BYTES = 8192
NUM_WARPS = 4


def tile_elems(dtype: torch.dtype) -> int:
    return _TILE_BYTES // dtype.itemsize


def row_tile(C: int, n_rows: int, dtype: torch.dtype) -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_C)`` for a kernel over ``n_rows`` rows of ``C`` elements.

    ``BLOCK_C`` is the power of two in 64..1024 that pads ``C`` least (the largest on ties; e.g.
    128 for C=1152, no padding), or next_power_of_2(C) below 64; ``BLOCK_R`` fills the tile.
    """
    if C < 64:
        block_c = triton.next_power_of_2(C)
    else:
        block_c = min((1024, 512, 256, 128, 64), key=lambda b: triton.cdiv(C, b) * b)
    block_r = max(1, min(triton.next_power_of_2(max(n_rows, 1)), tile_elems(dtype) // block_c))
    return block_r, block_c


def flat_block(dtype: torch.dtype) -> int:
    """Elements per program of a flat elementwise kernel."""
    return tile_elems(dtype)


def device_guard(t: torch.Tensor):
    """Make ``t``'s CUDA device current while launching (Triton launches on the current device)."""
    if t.is_cuda and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device.index)
    return contextlib.nullcontext()
