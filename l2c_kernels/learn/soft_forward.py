"""A differentiable transformer call with soft branch caches (router training).

Every branch is computed; its output is mixed with the cache as ``w * fresh + (1 - w) * cache``
and the mix becomes the new cache, so the cache a branch would reuse at inference (possibly
several steps old) is what the router is trained against. ``w`` is 1 for a branch with an empty
cache (the first step).

With ``forecast="linear"`` the cache is extrapolated the way a linear-forecast schedule does it:
each branch carries its anchor ``a`` (last computed output), slope ``d`` (per step) and the age
``k`` of the anchor; the reused value at a step is ``c + d`` (one step on from the previous
value ``c``), and a step mixing in a fresh output ``y`` with weight ``w`` updates
``d <- w (y - a) / k + (1 - w) d``, ``a <- w y + (1 - w) a``, ``k <- 1 + (1 - w) k``. For ``w`` in
{0, 1} this is exactly ``y1 + (s - s1) / (s1 - s0) (y1 - y0)`` of the runtime; in between it
is differentiable in ``w``.

:func:`soft_forward` dispatches on the level the families registry decides for the caches' branches: the
branch-level path through the model's block adapter (DiT / PixArt, below), whole blocks (the pattern-table
families, ``soft_blocks.py``) or SD3 / Flux units (``soft_branches.py``). A function registered with
:func:`register_soft_forward` for a model class comes first; it has the signature of :func:`soft_forward` and
uses :class:`SoftCaches` the same way (one "branch" per unit it caches).
"""
from __future__ import annotations

import torch

from ..adapters import StepInputs, adapter_for, level_for
from ..schedule import BLOCK_LEVEL, BRANCH_LEVEL, TWO_STREAM_LEVEL
from .soft_blocks import soft_block_forward
from .soft_branches import soft_branch_forward
from .soft_caches import SoftCaches  # noqa: F401  (re-exported: soft forwards take it)


#: soft forwards registered for a model class (:func:`register_soft_forward`); they come before the level's own
_SOFT_FORWARDS: dict = {}


def register_soft_forward(model_class_name: str, fn) -> None:
    """Use ``fn(model, args, w, caches, record=None) -> output`` for models of class ``model_class_name``."""
    _SOFT_FORWARDS[model_class_name] = fn


def soft_forward(model, args: dict, w: torch.Tensor | None, caches: SoftCaches,
                 record: list | None = None) -> torch.Tensor:
    """One transformer call; ``w[block, branch]`` in [0, 1] is the weight of the fresh output.

    ``record``, if given, collects ``(block, branch, fresh_output)`` for change measurements. The level is the
    one the families registry decides for ``caches.branches`` (:func:`~l2c_kernels.adapters.level_for`): branch
    pieces through the block adapter (DiT / PixArt), whole blocks (the pattern table; ``soft_blocks.py``), or
    SD3 / Flux units (``soft_branches.py``); a function registered for the model's class comes first.
    """
    fn = _SOFT_FORWARDS.get(type(getattr(model, "original_model", model)).__name__)
    if fn is None:
        fn = {BRANCH_LEVEL: branch_soft_forward, BLOCK_LEVEL: soft_block_forward,
              TWO_STREAM_LEVEL: soft_branch_forward}[level_for(model, caches.branches)]
    return fn(model, args, w, caches, record=record)


def branch_soft_forward(model, args: dict, w: torch.Tensor | None, caches: SoftCaches,
                        record: list | None = None) -> torch.Tensor:
    """The branch-level soft forward through the model's block adapter."""
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
                mixed = caches.mix(b, i, y, None if w is None else w[b, i])
                gate = ad.branch_gate(name, bctx)
                h = h + (mixed if gate is None else gate[:, None, :] * mixed)
        return ad.finish(model, h, ctx, inputs)
