"""Each block's FLOPs, counted on a real call with :class:`torch.utils.flop_counter.FlopCounterMode`.

Block-level budgets weigh a block by what it costs: in Flux a double-stream block and a single-stream
block differ, and both depend on the real number of text and image tokens. The count covers what
FlopCounterMode counts (matrix products, convolutions, attention -- including PyTorch's CPU attention
kernel, which FlopCounterMode leaves out by itself), not elementwise work.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..adapters.patterns import find_blocks


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """aten._scaled_dot_product_flash_attention_for_cpu: QK^T and PV, 2 x B x H x L x S x (E + Ev)."""
    return sdpa_flop_count(query, key, value)  # (shapes: FlopCounterMode passes shapes)


_CUSTOM = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def measure_block_flops(model, *args, **kwargs) -> list[float]:
    """FLOPs of every cached block of ``model`` (forward order) for the call ``model(*args, **kwargs)``.

    Pass the result as ``unit_flops`` to :meth:`Schedule.from_mask` for budgets by counted FLOPs.
    """
    model = getattr(model, "original_model", model)
    refs = find_blocks(model)
    counts = [0.0] * len(refs)
    active: dict[int, FlopCounterMode] = {}
    handles = []
    for ref in refs:
        def pre(mod, args, i=ref.index):
            fc = FlopCounterMode(display=False, custom_mapping=_CUSTOM)
            fc.__enter__()
            active[i] = fc

        def post(mod, args, out, i=ref.index):
            fc = active.pop(i)
            fc.__exit__(None, None, None)
            counts[i] += float(fc.get_total_flops())

        handles.append(ref.module.register_forward_pre_hook(pre))
        handles.append(ref.module.register_forward_hook(post))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        for fc in active.values():
            fc.__exit__(None, None, None)
    return counts


def _unit_weights(schedule) -> tuple[list[list[float]], bool]:
    """``[block][branch]`` weights of the units, as :meth:`Schedule.flops_removed_fraction` weighs them (counted
    ``[block][branch]`` costs, else counted block costs, else the branch weights), and whether a block counts once,
    whole (counted block costs: a block is computed only when all of it is)."""
    nb, branches = schedule.num_blocks, schedule.branches
    if schedule.unit_branch_flops:
        return [[float(f) for f in row] for row in schedule.unit_branch_flops], False
    if schedule.unit_flops and len(schedule.unit_flops) == nb:
        return [[float(f) / len(branches)] * len(branches) for f in schedule.unit_flops], True
    return [[float(schedule.branch_flops.get(b, 1.0)) for b in branches]] * nb, False


def _computed(w: list, blk: list, whole: bool) -> float:
    return (sum(w) if all(blk) else 0.0) if whole else sum(f for f, c in zip(w, blk) if c)


def step_flops(schedule) -> list[tuple[float, float]]:
    """Per step: (FLOPs of full compute, FLOPs the step removes), each unit weighed as
    :meth:`Schedule.flops_removed_fraction` weighs it; their sums over all steps give that fraction."""
    w, whole = _unit_weights(schedule)
    full = sum(sum(r) for r in w)
    return [(full, full - sum(_computed(wr, blk, whole) for wr, blk in zip(w, row))) for row in schedule.compute_mask()]


def block_compute_fractions(schedule) -> list[float]:
    """Each block's cost computed over the schedule's steps, as a fraction of computing it at every step (the units
    weighed as in :func:`step_flops`): what a block costs on average under the schedule (AsyncDiff's split)."""
    w, whole = _unit_weights(schedule)
    mask, n = schedule.compute_mask(), max(1, schedule.num_steps)
    return [sum(_computed(w[b], row[b], whole) for row in mask) / n / (sum(w[b]) or 1.0)
            for b in range(schedule.num_blocks)]
