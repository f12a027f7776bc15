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

from ..schedule import BLOCK, BLOCK_UNIT, REUSE, Schedule, ScheduleError
from .block_work import BlockKind, apply_deltas, store_deltas
from .plan import StepPlan, compile_plans


@dataclass(frozen=True)
class BlockAction:
    compute: bool
    store: bool = False                       # (computed) write out - in to slot ``slot``
    slot: int = 0
    reads: tuple[tuple[int, float], ...] = ()  # (reused) residual = sum of weight * slot

    @property
    def plain_reuse(self) -> bool:
        return len(self.reads) == 1 and self.reads[0][1] == 1.0


def block_plans(schedule: Schedule) -> list[StepPlan]:
    """The step plans of a block-level schedule: the block is the one branch (a whole-block ``B`` is a reuse
    of that branch), identical plans interned to one object."""
    if not schedule.is_block_level:
        raise ScheduleError(f"a block-level schedule has branches ['block'], got {schedule.branches}")
    as_reuse = Schedule(timesteps=schedule.timesteps, branches=[BLOCK_UNIT], num_blocks=schedule.num_blocks,
                        plan=[[REUSE if e == BLOCK else e for e in row] for row in schedule.plan],
                        forecast=schedule.forecast)
    return compile_plans(as_reuse)


def block_actions(schedule: Schedule) -> list[tuple[BlockAction, ...]]:
    """``[step][block]`` -> :class:`BlockAction`, derived once from the schedule (equal steps share one tuple)."""
    interned: dict[tuple, tuple] = {}
    out = []
    for sp in block_plans(schedule):
        row = []
        for bp in sp.blocks:
            if bp.compute[0]:
                row.append(BlockAction(True, bp.store[0], bp.slot[0]))
            else:
                row.append(BlockAction(False, reads=tuple((j, w) for j, w in enumerate(bp.weights[0]) if w)))
        out.append(interned.setdefault(tuple(row), tuple(row)))
    return out


class BlockCaches:
    """Residual caches of one pass (a pipeline that calls the transformer twice per step, e.g. for the
    unconditional half, has one set per pass; with CUDA graphs, one set per pass and input signature):
    ``(block, stream, slot)`` -> ``out - in``."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.filled: set[tuple] = set()                 # (block, slot) written in this generation
        self.none_streams: dict = {}                    # block -> which returned streams were None
        self.ran: set[int] = set()                      # steps run in this generation
        self.generations = 0                            # whole generations run with these caches

    def buffer(self, block, stream: int, slot: int, like: torch.Tensor, shape=None) -> torch.Tensor:
        """The buffer of ``(block, stream, slot)``, (re)made with ``like``'s dtype and device and ``shape`` (default:
        ``like``'s) if it does not have them."""
        shape = like.shape if shape is None else shape
        buf = self.buffers.get((block, stream, slot))
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(shape, dtype=like.dtype, device=like.device)
            self.buffers[(block, stream, slot)] = buf
        return buf

    def read(self, block, stream: int, slot: int, like, step: int) -> torch.Tensor:
        """The filled buffer of ``(block, stream, slot)``, checked to have the shape of ``like`` (a tensor or a
        shape)."""
        buf = self.buffers.get((block, stream, slot))
        if (block, slot) not in self.filled or buf is None:
            raise ScheduleError(f"step {step} reuses block {block} but its residual cache was not filled in this "
                                f"generation (start at step 0, or call reset())")
        shape = like.shape if isinstance(like, torch.Tensor) else like
        if buf.shape != shape:
            raise ValueError(f"input shapes changed in the middle of a generation (step {step}): block {block} "
                             f"cached a residual of shape {list(buf.shape)}, the input now has {list(shape)}. "
                             f"Start a new generation at step 0 or call reset().")
        return buf

    def clear(self) -> None:
        self.filled.clear()
        self.none_streams.clear()
        self.ran.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers.values())

    # ------------------------------------------------------------------ host side of a block's work
    def store_buffers(self, block, slot: int, ins, nones: tuple) -> tuple:
        """Per stream, ``(buffer,)`` the block's residual is written to (None for a stream the block returns as
        None), marked as filled; the residual has the stream input's shape (checked on the block's first call)."""
        self.none_streams[block] = nones
        self.filled.add((block, slot))
        return tuple(None if n else (self.buffer(block, k, slot, x),) for k, (x, n) in enumerate(zip(ins, nones)))

    def reuse_buffers(self, block, action: BlockAction, ins, step: int) -> tuple:
        """Per stream, the residual buffers a reuse of ``block`` reads (None for a stream it returns as None);
        raises if this generation did not fill them or the shapes changed."""
        nones = self.none_streams.get(block)
        if nones is None or any((block, j) not in self.filled for j, _ in action.reads):
            raise ScheduleError(f"step {step} reuses block {block} but its residual cache was not filled in this "
                                f"generation (start at step 0, or call reset())")
        out = []
        for k, x in enumerate(ins):
            if nones[k]:
                out.append(None)
                continue
            if x is None:
                raise ValueError(f"block {block} returned a tensor for stream {k} when it was computed but now gets "
                                 f"None")
            out.append(tuple(self.read(block, k, j, x, step) for j, _ in action.reads))
        return tuple(out)


def reuse_kind(action: BlockAction, single: bool, compiled: bool) -> BlockKind:
    """The :class:`BlockKind` of a reuse (plain: one residual of weight 1; else a forecast)."""
    return BlockKind(False, False, 1 if action.plain_reuse else max(2, len(action.reads)), single, False, compiled)


def store_residuals(caches: BlockCaches, block, slot: int, outs, ins) -> None:
    """``cache <- out - in`` for every returned stream (streams returned as None are remembered as such)."""
    bufs = caches.store_buffers(block, slot, ins, tuple(o is None for o in outs))
    store_deltas(outs, ins, bufs)


def apply_residuals(caches: BlockCaches, block, action: BlockAction, ins, step: int) -> list:
    """The block's outputs on a reuse step: each stream's input plus its cached (or forecast) residual."""
    bufs = caches.reuse_buffers(block, action, ins, step)
    return apply_deltas(ins, bufs, reuse_kind(action, False, False), tuple(w for _, w in action.reads), ())
