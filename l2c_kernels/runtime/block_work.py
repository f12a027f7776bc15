"""One block's tensor work at one step of a block-level schedule, by kind: the unit ``torch.compile`` compiles.

:func:`block_work` depends on the step only through its arguments: the block (``torch.compile`` takes its
parameters as inputs, so the blocks of one class and configuration share a graph), the block's call
arguments, its stream inputs, the static :class:`BlockKind` and the cache buffers. So the number of
compiled graphs is the number of (block structure, kind) pairs a schedule uses -- compute,
compute-and-store, reuse, forecast from 2 or 3 residuals -- whatever its number of distinct step plans.
The host work around it (which buffers, whether they were filled) is
:class:`~l2c_kernels.runtime.block_cache.BlockCaches`'; the checks of the block pattern run eagerly on
each block's first call, before anything is compiled.
"""
from __future__ import annotations

import types
from typing import NamedTuple

import torch

from .. import ops


class BlockKind(NamedTuple):
    """The static shape of one block's work at one step (a ``torch.compile`` guard: one graph per kind)."""

    compute: bool       # run the block (else re-add its cached residual per stream)
    store: bool         # (computed) write ``out - in`` of each returned stream to its buffer
    reads: int          # (reused) how many cached residuals are summed: 1 plain reuse, 2/3 a forecast
    single: bool        # the block returns one tensor, not a tuple
    clone: bool         # (computed and stored) the block writes its inputs in place: copy them first
    compiled: bool      # traced by torch.compile: a forecast is tensor arithmetic the compiler fuses


def block_work(block, args: tuple, kwargs: dict, ins: list, kind: BlockKind, bufs: tuple, weights: tuple,
               wtensors: tuple):
    """Block ``block`` called with ``args``/``kwargs`` (``ins``: its stream inputs, in its return order) as
    ``kind`` says. ``bufs``: per stream, the residual buffers it writes (one) or reads (``kind.reads``), or
    None for a stream the block returns as None; ``weights`` / ``wtensors``: a forecast's weights as floats
    (eager, one fused pass) and as 0-d tensors (compiled: the weights are inputs, not constants)."""
    if kind.compute:
        saved = [x.clone() if x is not None else None for x in ins] if kind.store and kind.clone else ins
        out = block(*args, **kwargs)
        if kind.store:
            store_deltas((out,) if kind.single else out, saved, bufs)
        return out
    outs = apply_deltas(ins, bufs, kind, weights, wtensors)
    return outs[0] if kind.single else tuple(outs)


def unit_work(units_fn, blk, units: tuple, run, h, e, temb, bound):
    """One two-stream block's units at one step of a branch-level schedule (``units_fn``: the block's forward unit by
    unit, :mod:`~l2c_kernels.runtime.branch_wrappers`; ``run``: its prepared units, whose kind, buffers and forecast
    weights are all the step changes): the function ``torch_compile`` compiles there, one graph per block structure
    and unit kind, whatever the step."""
    return units_fn(blk, units, run, h, e, temb, bound)


def store_deltas(outs, ins, bufs) -> None:
    """``buffer <- out - in`` for every returned stream that has a buffer."""
    for o, i, b in zip(outs, ins, bufs):
        if b is not None:
            ops.residual_delta_store_(b[0], o, i)


def apply_deltas(ins, bufs, kind: BlockKind, weights: tuple, wtensors: tuple) -> list:
    """Each stream's input plus its cached residual, or a weighted sum of its last residuals (a forecast)."""
    outs = []
    for x, bb in zip(ins, bufs):
        if bb is None:
            outs.append(None)
        elif kind.reads == 1:
            y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            ops.residual_apply_(y, x, bb[0])
            outs.append(y)
        elif kind.compiled:
            y = x + bb[0] * wtensors[0]
            for t, c in zip(bb[1:], wtensors[1:]):
                y = y + t * c
            outs.append(y)
        else:  # one fused pass after the copy: y = x + sum_j w_j * residual_j
            y = x.contiguous().clone()
            w = list(weights) + [0.0] * (3 - len(weights))
            v = [t.reshape(t.shape[0], -1, t.shape[-1]) for t in [y, *bb]]
            ops.forecast_residual_(v[0], v[1], v[2] if len(v) > 2 else v[1], v[3] if len(v) > 3 else None,
                                   None, w[0], w[1], w[2])
            outs.append(y)
    return outs


def compiled_work(fn, options: bool | dict):
    """``fn`` (:func:`block_work`, or a two-stream block's ``unit_work`` at branch level) under
    ``torch.compile(fullgraph=True, dynamic=False)`` (plus ``options`` if a dict), on a code object of its own: one
    module's compiled kinds (dynamo caches them per code object) are neither shared with nor evicted by another
    module's."""
    opts = dict(fullgraph=True, dynamic=False)
    if isinstance(options, dict):
        opts.update(options)
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)
    return torch.compile(own, **opts)
