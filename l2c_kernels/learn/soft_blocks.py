"""A differentiable transformer call with soft *block* caches, for families run at block level.

Flux, SD3, Wan and the other families of :mod:`l2c_kernels.adapters.patterns` are cached per block:
a reused block returns its inputs plus its cached residual ``out - in``, per token stream (image
tokens, and the text tokens of joint-attention blocks). The router trains against the soft version
of that: every block is computed, and each stream it returns becomes

    out_soft = in + w * (fresh_out - in) + (1 - w) * cached_delta

with ``w = w[block, 0]`` (one weight per block, shared by its streams); the mixed residual is the new
cache, so what a block would reuse at inference (possibly several steps old) is what the router sees.
``w`` in {0, 1} gives exactly the hard schedule's outputs: a computed block, or ``in + cached``.
With a ``"linear"`` :class:`~l2c_kernels.learn.soft_forward.SoftCaches` the cached residual is
extrapolated as the runtime's linear forecast does.

It runs the family's own forward on a *shadow* of the model, as the block-level runtime
(:mod:`l2c_kernels.runtime.block_runtime`) does: a shallow copy of the top module whose block lists
hold wrappers around the same block objects (weights shared, the user's model untouched). The
wrapper reads the streams from the block's arguments by name and the outputs in the order of the
block's pattern entry. A stream a block returns as ``None`` (SD3's last block has no text output)
stays ``None``.

:func:`~l2c_kernels.learn.soft_forward.soft_forward` runs it wherever the families registry decides block level
(the pattern-table families without a branch adapter by default, any of them with ``branches=["block"]``). The caches are the learner's :class:`SoftCaches` (one unit per block);
a block with two streams uses a second entry of its row, so detaching the caches between steps
(step-wise training) covers every stream.
"""
from __future__ import annotations

import torch
from torch import nn

from ..adapters.patterns import HIDDEN, find_blocks, pattern_for
from ..runtime.block_runtime import BlockStandIn, shadow_with
from .soft_caches import SoftCaches


class _SoftState:
    """What the wrappers of one soft call share."""

    def __init__(self, w, caches: SoftCaches, record):
        self.w, self.caches, self.record = w, caches, record
        self.next_block = 0


class _SoftBlock(BlockStandIn):
    """Stands in for one block in the shadow's block list: computes it and mixes each stream's residual."""

    def forward(self, *args, **kwargs):
        st, ref = self._state, self._ref
        if ref.index != st.next_block:
            raise RuntimeError(f"the forward ran block {ref.list_name}[{ref.list_index}] out of order (expected "
                               f"block {st.next_block} of the pattern's forward order)")
        st.next_block += 1
        names = ref.pattern.returns
        bound = self._sig.bind(*args, **kwargs).arguments
        ins = [bound.get(n) for n in names]
        out = self.block(*args, **kwargs)
        outs = [out] if ref.pattern.single_output else list(out)
        if len(outs) != len(names):
            raise RuntimeError(f"{type(self.block).__name__} returned {len(outs)} outputs; its pattern says "
                               f"({', '.join(names)})")
        _ensure_streams(st.caches, ref.index, len(names))
        wb = None if st.w is None else st.w[ref.index, 0]
        mixed_outs = []
        for k, (name, x, o) in enumerate(zip(names, ins, outs)):
            if o is None:
                mixed_outs.append(None)
                continue
            if x is None or x.shape != o.shape:
                raise RuntimeError(f"{type(self.block).__name__}: stream {name} has no input of its output's shape")
            delta = o - x
            if st.record is not None and name == HIDDEN:
                st.record.append((ref.index, 0, delta.detach()))
            mixed_outs.append(x + st.caches.mix(ref.index, k, delta, wb))
        return mixed_outs[0] if ref.pattern.single_output else tuple(mixed_outs)


def _ensure_streams(caches: SoftCaches, block: int, n: int) -> None:
    """Give ``block`` one cache entry per stream (its row starts with one, for the block's unit)."""
    for rows in (caches.values, caches.linear):
        row = rows[block]
        while len(row) < n:
            row.append(None)


def _shadow(model: nn.Module, state: _SoftState) -> nn.Module:
    fam = pattern_for(model)
    refs = find_blocks(model, fam)
    return shadow_with(model, fam, refs, lambda r: _SoftBlock(r, state)), len(refs)


def soft_block_forward(model, args: dict, w: torch.Tensor | None, caches: SoftCaches,
                       record: list | None = None) -> torch.Tensor:
    """One transformer call (``args``: its keyword arguments) with soft block caches; returns the output
    tensor. ``w[block, 0]`` in [0, 1] is the weight of each block's fresh residual (``None``: all computed).
    ``record``, if given, collects ``(block, 0, fresh image-stream residual)``."""
    model = getattr(model, "original_model", model)
    state = _SoftState(w, caches, record)
    shadow, nblocks = _shadow(model, state)
    if w is not None and (w.dim() != 2 or w.shape[0] != nblocks or w.shape[1] != 1):
        raise ValueError(f"w has shape {list(w.shape)}; the block-level soft forward of {type(model).__name__} "
                         f"takes one weight per block, [{nblocks}, 1]")
    out = shadow(**args)
    if state.next_block != nblocks:
        raise RuntimeError(f"{type(model).__name__}'s forward ran {state.next_block} of its {nblocks} blocks")
    if hasattr(out, "sample"):
        return out.sample
    return out[0] if isinstance(out, (tuple, list)) else out
