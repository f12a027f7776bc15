"""Cache buffers of one input signature (batch, tokens, width, dtype, device)."""
from __future__ import annotations

import torch


class CacheSet:
    """Branch caches ``[B, N, C]`` (``[B/2, N, C]`` for CFG-mean cross-attention), the differences of a
    branch's last outputs (schedules with a forecast) and block residuals.

    Buffers are allocated on first use and live outside any CUDA graph, so graphs of different
    steps read what other steps wrote. ``filled`` records, on the host, which caches hold data
    of the current generation, so a reuse of an empty cache is reported instead of read.
    """

    def __init__(self, like: torch.Tensor):
        self.shape = tuple(like.shape)
        self.dtype, self.device = like.dtype, like.device
        self.branch: dict[tuple[int, int], torch.Tensor] = {}
        self.delta: dict[int, torch.Tensor] = {}
        self.diff: dict[tuple[int, int, int], torch.Tensor] = {}
        self.filled: set = set()
        self.half_dirty: set = set()  # caches whose second half was written by a collapsed (half-batch) step

    def branch_buffer(self, block: int, branch: int, half: bool = False) -> torch.Tensor:
        buf = self.branch.get((block, branch))
        if buf is None:
            shape = (self.shape[0] // 2,) + self.shape[1:] if half else self.shape
            buf = torch.empty(shape, dtype=self.dtype, device=self.device)
            self.branch[(block, branch)] = buf
        return buf

    def diff_buffer(self, block: int, branch: int, order: int = 1) -> torch.Tensor:
        """``order`` 1: the difference of the branch's last two outputs; 2: the one before it."""
        buf = self.diff.get((block, branch, order))
        if buf is None:
            buf = self.diff[(block, branch, order)] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return buf

    def delta_buffer(self, block: int) -> torch.Tensor:
        buf = self.delta.get(block)
        if buf is None:
            buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            self.delta[block] = buf
        return buf

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.branch.values(), *self.delta.values(), *self.diff.values()])
