"""A differentiable transformer call with soft branch caches (router training).

Every branch is computed; its output is mixed with the cache as ``w * fresh + (1 - w) * cache``
and the mix becomes the new cache, so the cache a branch would reuse at inference (possibly
several steps old) is what the router is trained against. ``w`` is 1 for a branch with an empty
cache (the first step).
"""
from __future__ import annotations

import torch

from ..adapters import StepInputs, adapter_for


class SoftCaches:
    """Per (block, branch) cached outputs carried along one sampling trajectory."""

    def __init__(self, num_blocks: int, num_branches: int):
        self.values: list[list[torch.Tensor | None]] = [[None] * num_branches for _ in range(num_blocks)]


def soft_forward(model, args: dict, w: torch.Tensor | None, caches: SoftCaches,
                 record: list | None = None) -> torch.Tensor:
    """One transformer call; ``w[block, branch]`` in [0, 1] is the weight of the fresh output.

    ``record``, if given, collects ``(block, branch, fresh_output)`` for change measurements.
    """
    from .. import ops

    ad = adapter_for(model)
    inputs = StepInputs(args=args)
    with ops.use_backend("torch"):  # plain differentiable PyTorch for the modulation
        h, ctx = ad.prepare(model, inputs)
        branches = ad.branches(model)
        for b, block in enumerate(ad.blocks(model)):
            bctx = ad.block_context(block, ctx)
            for i, name in enumerate(branches):
                y = ad.compute_branch(block, name, h, bctx, ctx)
                if record is not None:
                    record.append((b, i, y.detach()))
                c = caches.values[b][i]
                mixed = y if (c is None or w is None) else w[b, i] * y + (1 - w[b, i]) * c
                caches.values[b][i] = mixed
                gate = ad.branch_gate(name, bctx)
                h = h + (mixed if gate is None else gate[:, None, :] * mixed)
        return ad.finish(model, h, ctx, inputs)
