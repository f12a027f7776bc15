"""One block's work at one step, by kind: the unit ``torch.compile`` compiles.

:func:`run_block` depends on the step only through its arguments: the block (whose parameters
``torch.compile`` takes as inputs, so every block of a model shares one graph), the residual stream,
the step context, the static ``kind`` of :func:`~l2c_kernels.runtime.caches.block_kind` and the cache
buffers. So the number of compiled graphs is the number of distinct kinds a schedule uses (compute /
store / reuse / forecast per branch, whole-block reuse), whatever the number of distinct step plans.
On the compiled path a forecast takes its weights as tensors (one graph for every set of weights) and
``torch.compile`` fuses the weighted sum; eagerly it is one fused ``ops.forecast_residual_`` pass.

:func:`run_reuse_step` is the other unit: a step at which every block does the same work and none of it is a
branch computation (all reused, forecast or whole-block reused) runs as one graph over all blocks. Such a step is
a few small GEMVs and adds per block, so one call per block would cost more in call overhead than in work; its
graph is compiled once per kind as well (a step of each reuse kind), so the count stays bounded by the kinds.
"""
from __future__ import annotations

import torch

from .. import ops


def run_block(adapter, block, h: torch.Tensor, ctx, kind: tuple, bufs: tuple, weights: tuple, wtensors: tuple,
              delta) -> torch.Tensor:
    """Block ``block`` on residual stream ``h`` (updated in place and returned) as ``kind`` says."""
    reuse_block, store_delta, any_compute, codes, branches, collapsed, compiled = kind
    if reuse_block:
        ops.gated_residual_(h, delta)
        return h
    inp = h.clone() if store_delta else None
    # a block that computes no branch needs only its gates
    bctx = adapter.block_context(block, ctx) if any_compute else adapter.block_gates(block, ctx)
    half = h.shape[0] // 2
    for name, code, bb, w, wt in zip(branches, codes, bufs, weights, wtensors):
        gate = adapter.branch_gate(name, bctx)
        if code in ("c", "s", "m"):
            y = adapter.compute_branch(block, name, h, bctx, ctx)
            if code == "m":
                ops.cfg_mean_store_(h, y, bb[0])
            else:
                ops.gated_residual_(h, y, gate, bb[0] if code == "s" else None)
        elif code == "q":
            if collapsed:
                ops.gated_residual_(h, bb[0])
            else:
                ops.gated_residual_(h[:half], bb[0])
                ops.gated_residual_(h[half:], bb[0])
        elif code == "r":
            ops.gated_residual_(h, bb[0], gate)
        elif compiled:  # forecast: the weighted sum as tensor arithmetic, fused by the compiler
            y = bb[0] * wt[0]
            for t, c in zip(bb[1:], wt[1:]):
                y = y + t * c
            ops.gated_residual_(h, y, gate)
        else:  # forecast: h += gate * (sum of weighted last outputs), one pass
            c = list(w) + [0.0] * (3 - len(w))
            ops.forecast_residual_(h, bb[0], bb[1] if len(bb) > 1 else bb[0], bb[2] if len(bb) > 2 else None, gate, c[0], c[1], c[2])
    if store_delta:
        ops.residual_delta_store_(delta, h, inp)
    return h


def run_reuse_step(adapter, blocks: tuple, h: torch.Tensor, ctxs: tuple, kind: tuple, bufs: tuple, weights: tuple,
                   wtensors: tuple, deltas: tuple) -> torch.Tensor:
    """Every block of ``blocks`` doing ``kind`` (a kind that computes no branch) on ``h``, in order; the
    per-block arguments (``ctxs``: each block's ``adapter.traced_context``) are tuples over the blocks."""
    for block, ctx, bb, w, wt, d in zip(blocks, ctxs, bufs, weights, wtensors, deltas):
        h = run_block(adapter, block, h, ctx, kind, bb, w, wt, d)
    return h
