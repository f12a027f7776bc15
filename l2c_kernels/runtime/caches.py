"""Cache buffers of one input signature (batch, tokens, width, dtype, device)."""
from __future__ import annotations

import torch


class CacheSet:
    """Branch caches ``[B, N, C]`` (``[B/2, N, C]`` for CFG-mean cross-attention), with more slots per
    branch for schedules with a forecast (its last outputs), and block residuals.

    Buffers are allocated on first use and live outside any CUDA graph, so graphs of different
    steps read what other steps wrote. ``filled`` records, on the host, which caches hold data
    of the current generation, so a reuse of an empty cache is reported instead of read.
    """

    def __init__(self, like: torch.Tensor):
        self.shape = tuple(like.shape)
        self.dtype, self.device = like.dtype, like.device
        self.branch: dict[tuple[int, int], torch.Tensor] = {}
        self.delta: dict[int, torch.Tensor] = {}
        self.slots: dict[tuple[int, int, int], torch.Tensor] = {}
        self.filled: set = set()
        self.half_dirty: set = set()  # caches whose second half was written by a collapsed (half-batch) step

    def branch_buffer(self, block: int, branch: int, half: bool = False) -> torch.Tensor:
        buf = self.branch.get((block, branch))
        if buf is None:
            shape = (self.shape[0] // 2,) + self.shape[1:] if half else self.shape
            buf = torch.empty(shape, dtype=self.dtype, device=self.device)
            self.branch[(block, branch)] = buf
        return buf

    def slot_buffer(self, block: int, branch: int, slot: int) -> torch.Tensor:
        """Slot ``slot`` of a branch's ring of last outputs (slot 0 is :meth:`branch_buffer`)."""
        if slot == 0:
            return self.branch_buffer(block, branch)
        buf = self.slots.get((block, branch, slot))
        if buf is None:
            buf = self.slots[(block, branch, slot)] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return buf

    @staticmethod
    def slot_key(block: int, branch: int, slot: int) -> tuple:
        """The ``filled`` key of a slot (slot 0 shares the plain branch cache's key)."""
        return (block, branch) if slot == 0 else ("slot", block, branch, slot)

    def delta_buffer(self, block: int) -> torch.Tensor:
        buf = self.delta.get(block)
        if buf is None:
            buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            self.delta[block] = buf
        return buf

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.branch.values(), *self.delta.values(), *self.slots.values()])
