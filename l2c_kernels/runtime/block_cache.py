"""Per-block work of a block-level schedule: what each step does with each block, and the residual caches.

A block-level schedule has one unit per block (``branches == ["block"]``): ``C`` computes the block,
``R`` (or ``B``) replaces it by its input plus its cached residual ``out - in`` (per token stream), or
by a forecast of that residual from the block's last computations when ``schedule.forecast`` is set.
The step plans come from :func:`~l2c_kernels.runtime.plan.compile_plans` (a block is the one branch),
so stores happen only where a later step reads them and forecast weights are fixed before sampling.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..schedule import BLOCK, REUSE, Schedule, ScheduleError
from .plan import compile_plans


@dataclass(frozen=True)
class BlockAction:
    compute: bool
    store: bool = False                       # (computed) write out - in to slot ``slot``
    slot: int = 0
    reads: tuple[tuple[int, float], ...] = ()  # (reused) residual = sum of weight * slot

    @property
    def plain_reuse(self) -> bool:
        return len(self.reads) == 1 and self.reads[0][1] == 1.0


def block_actions(schedule: Schedule) -> list[tuple[BlockAction, ...]]:
    """``[step][block]`` -> :class:`BlockAction`, derived once from the schedule."""
    if schedule.branches != ["block"]:
        raise ScheduleError(f"a block-level schedule has branches ['block'], got {schedule.branches}")
    as_reuse = Schedule(timesteps=schedule.timesteps, branches=["block"], num_blocks=schedule.num_blocks,
                        plan=[[REUSE if e == BLOCK else e for e in row] for row in schedule.plan],
                        forecast=schedule.forecast)
    out = []
    for sp in compile_plans(as_reuse):
        row = []
        for bp in sp.blocks:
            if bp.compute[0]:
                row.append(BlockAction(True, bp.store[0], bp.slot[0]))
            else:
                row.append(BlockAction(False, reads=tuple((j, w) for j, w in enumerate(bp.weights[0]) if w)))
        out.append(tuple(row))
    return out


class BlockCaches:
    """Residual caches of one pass (a pipeline that calls the transformer twice per step, e.g. for the
    unconditional half, has one set per pass): ``(block, stream, slot)`` -> ``out - in``."""

    def __init__(self):
        self.buffers: dict[tuple[int, int, int], torch.Tensor] = {}
        self.filled: set[tuple[int, int]] = set()       # (block, slot) written in this generation
        self.none_streams: dict[int, tuple[bool, ...]] = {}  # block -> which returned streams were None

    def buffer(self, block: int, stream: int, slot: int, like: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get((block, stream, slot))
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(like.shape, dtype=like.dtype, device=like.device)
            self.buffers[(block, stream, slot)] = buf
        return buf

    def read(self, block: int, stream: int, slot: int, like: torch.Tensor, step: int) -> torch.Tensor:
        buf = self.buffers.get((block, stream, slot))
        if (block, slot) not in self.filled or buf is None:
            raise ScheduleError(f"step {step} reuses block {block} but its residual cache was not filled in this "
                                f"generation (start at step 0, or call reset())")
        if buf.shape != like.shape:
            raise ValueError(f"input shapes changed in the middle of a generation (step {step}): block {block} "
                             f"cached a residual of shape {list(buf.shape)}, the input now has {list(like.shape)}. "
                             f"Start a new generation at step 0 or call reset().")
        return buf

    def clear(self) -> None:
        self.filled.clear()
        self.none_streams.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers.values())


def store_residuals(caches: BlockCaches, block: int, slot: int, outs, ins) -> None:
    """``cache <- out - in`` for every returned stream (streams returned as None are remembered as such)."""
    for k, (o, i) in enumerate(zip(outs, ins)):
        if o is not None:
            ops.residual_delta_store_(caches.buffer(block, k, slot, o), o, i)
    caches.none_streams[block] = tuple(o is None for o in outs)
    caches.filled.add((block, slot))


def apply_residuals(caches: BlockCaches, block: int, action: BlockAction, ins, step: int) -> list:
    """The block's outputs on a reuse step: each stream's input plus its cached (or forecast) residual."""
    nones = caches.none_streams.get(block)
    if nones is None or any((block, j) not in caches.filled for j, _ in action.reads):
        raise ScheduleError(f"step {step} reuses block {block} but its residual cache was not filled in this "
                            f"generation (start at step 0, or call reset())")
    outs = []
    for k, x in enumerate(ins):
        if nones[k]:
            outs.append(None)
            continue
        if x is None:
            raise ValueError(f"block {block} returned a tensor for stream {k} when it was computed but now gets None")
        ys = [caches.read(block, k, j, x, step) for j, _ in action.reads]
        if action.plain_reuse:
            y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            ops.residual_apply_(y, x, ys[0])
        else:  # forecast: y = x + sum_j w_j * residual_j, one pass after the copy
            y = x.contiguous().clone()
            w = [float(wj) for _, wj in action.reads] + [0.0] * (3 - len(ys))
            v = [t.reshape(t.shape[0], -1, t.shape[-1]) for t in [y, *ys]]
            ops.forecast_residual_(v[0], v[1], v[2] if len(v) > 2 else v[1], v[3] if len(v) > 3 else None,
                                   None, w[0], w[1], w[2])
        outs.append(y)
    return outs
