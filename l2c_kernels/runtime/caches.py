"""Cache buffers of one input signature (batch, tokens, width, dtype, device), and per step the buffers
each block reads and writes (looked up, not recomputed, at run time)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .plan import StepPlan, slot_key


class BlockCall(NamedTuple):
    """What one block does at one step: its kind (static, see :func:`block_kind`) and the buffers it uses."""

    kind: tuple
    bufs: tuple        # per branch: the cache buffers a computed branch writes / a reused branch reads
    weights: tuple     # per branch: forecast weights of the buffers read (floats)
    wtensors: tuple    # the same weights as 0-d tensors (the compiled path takes them as inputs)
    delta: torch.Tensor | None  # the block residual buffer (written or read)


def block_kind(plan: StepPlan, b: int, collapsed: bool, compiled: bool) -> tuple:
    """The static shape of block ``b``'s work at ``plan``, shared by every block and step that does the same
    thing: ``(reuse_block, store_delta, any_compute, codes, branches, collapsed, compiled)``. A branch's code
    is ``c`` compute, ``s`` compute and store, ``m`` compute and store the CFG mean, ``q`` add the CFG-mean
    cache, ``r`` add one cached output, ``f2``/``f3`` add a forecast from 2/3 cached outputs."""
    bp = plan.blocks[b]
    if bp.reuse_block:
        return (True, False, False, (), plan.branches, collapsed, compiled)
    codes = []
    for i, name in enumerate(plan.branches):
        cfg_mean = plan.attn2_cfg_mean and name == "attn2"
        if bp.compute[i]:
            codes.append(("m" if cfg_mean else "s") if bp.store[i] else "c")
        elif cfg_mean:
            codes.append("q")
        else:
            reads = bp.reads(i)
            codes.append("r" if len(reads) == 1 and bp.weights[i][reads[0]] == 1.0 else f"f{len(reads)}")
    return (False, bp.store_delta, any(bp.compute), tuple(codes), plan.branches, collapsed, compiled)


class CacheSet:
    """Branch caches ``[B, N, C]`` (``[B/2, N, C]`` for CFG-mean cross-attention), with more slots per
    branch for schedules with a forecast (its last outputs), and block residuals.

    Buffers live outside any CUDA graph, so graphs of different steps read what other steps wrote.
    :meth:`calls` gives, per step, every block's :class:`BlockCall` (built once per step and kept).
    """

    def __init__(self, like: torch.Tensor):
        self.shape = tuple(like.shape)
        self.dtype, self.device = like.dtype, like.device
        self.branch: dict[tuple[int, int], torch.Tensor] = {}
        self.delta: dict[int, torch.Tensor] = {}
        self.slots: dict[tuple[int, int, int], torch.Tensor] = {}
        self.generations = 0     # whole generations run with this signature
        self._calls: dict[tuple, tuple[BlockCall, ...]] = {}

    def branch_buffer(self, block: int, branch: int, half: bool = False) -> torch.Tensor:
        buf = self.branch.get((block, branch))
        if buf is None:
            shape = (self.shape[0] // 2,) + self.shape[1:] if half else self.shape
            buf = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.branch[(block, branch)] = buf
        return buf

    def slot_buffer(self, block: int, branch: int, slot: int) -> torch.Tensor:
        """Slot ``slot`` of a branch's ring of last outputs (slot 0 is :meth:`branch_buffer`)."""
        if slot == 0:
            return self.branch_buffer(block, branch)
        buf = self.slots.get((block, branch, slot))
        if buf is None:
            buf = self.slots[(block, branch, slot)] = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        return buf

    slot_key = staticmethod(slot_key)   # the key of a slot: plan.slot_key

    def delta_buffer(self, block: int) -> torch.Tensor:
        buf = self.delta.get(block)
        if buf is None:
            buf = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
            self.delta[block] = buf
        return buf

    def buffer_for(self, key: tuple) -> torch.Tensor:
        """The buffer of a key of :func:`~l2c_kernels.runtime.plan.cache_reads_writes`."""
        if key[0] == "delta":
            return self.delta_buffer(key[1])
        if key[0] == "slot":
            return self.slot_buffer(*key[1:])
        return self.branch[key] if key in self.branch else self.branch_buffer(*key)

    def all_buffers(self) -> list[torch.Tensor]:
        return [*self.branch.values(), *self.delta.values(), *self.slots.values()]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.all_buffers())

    # ------------------------------------------------------------------------------------- per-step lookup
    def calls(self, step: int, plan: StepPlan, collapsed: bool, compiled: bool) -> tuple[BlockCall, ...]:
        key = (step, collapsed, compiled)
        out = self._calls.get(key)
        if out is None:
            out = self._calls[key] = tuple(self._block_call(plan, b, collapsed, compiled)
                                           for b in range(len(plan.blocks)))
        return out

    def _block_call(self, plan: StepPlan, b: int, collapsed: bool, compiled: bool) -> BlockCall:
        def per_sample(buf):
            return buf[buf.shape[0] // 2:] if collapsed else buf

        kind = block_kind(plan, b, collapsed, compiled)
        bp = plan.blocks[b]
        if bp.reuse_block:
            return BlockCall(kind, (), (), (), per_sample(self.delta_buffer(b)))
        bufs, weights = [], []
        for i, code in enumerate(kind[3]):
            if code in ("m", "q"):
                bufs.append((self.branch_buffer(b, i, half=True),))
                weights.append(())
            elif code == "s":
                bufs.append((per_sample(self.slot_buffer(b, i, bp.slot[i])),))
                weights.append(())
            elif code == "c":
                bufs.append(())
                weights.append(())
            else:
                reads = bp.reads(i)
                bufs.append(tuple(per_sample(self.slot_buffer(b, i, j)) for j in reads))
                weights.append(tuple(float(bp.weights[i][j]) for j in reads))
        wt = tuple(tuple(torch.tensor(w, dtype=self.dtype, device=self.device) for w in ws) for ws in weights)
        delta = per_sample(self.delta_buffer(b)) if bp.store_delta else None
        return BlockCall(kind, tuple(bufs), tuple(weights), wt, delta)
