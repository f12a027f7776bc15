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

:func:`soft_forward` dispatches on the model: a function registered with
:func:`register_soft_forward` for a model class (e.g. a block-level soft forward for families
whose unit is the whole block, ``soft_blocks.py``) is used before the branch-level path through
the model's block adapter, which is the default; :class:`SoftCaches` made with ``branches=`` naming SD3 / Flux
units select those families' branch level (``soft_branches.py``). A registered function has the signature of
:func:`soft_forward` and uses :class:`SoftCaches` the same way (one "branch" per unit it caches).
"""
from __future__ import annotations

import torch

from ..adapters import StepInputs, adapter_for


from .soft_caches import SoftCaches  # noqa: E402,F401  (re-exported: soft forwards take it)


_SOFT_FORWARDS: dict = {}
#: Modules (in this package) imported the first time a model class has no registered soft forward.
PLUGIN_MODULES = ["soft_blocks"]
_plugins_loaded = False


def register_soft_forward(model_class_name: str, fn) -> None:
    """Use ``fn(model, args, w, caches, record=None) -> output`` for models of class ``model_class_name``."""
    _SOFT_FORWARDS[model_class_name] = fn


def _registered(model):
    global _plugins_loaded
    name = type(getattr(model, "original_model", model)).__name__
    if name not in _SOFT_FORWARDS and not _plugins_loaded:
        import importlib

        _plugins_loaded = True
        for mod in PLUGIN_MODULES:
            try:
                importlib.import_module(f"{__package__}.{mod}")
            except ModuleNotFoundError as e:
                if e.name != f"{__package__}.{mod}":
                    raise
    return _SOFT_FORWARDS.get(name)


def soft_forward(model, args: dict, w: torch.Tensor | None, caches: SoftCaches,
                 record: list | None = None) -> torch.Tensor:
    """One transformer call; ``w[block, branch]`` in [0, 1] is the weight of the fresh output.

    ``record``, if given, collects ``(block, branch, fresh_output)`` for change measurements.
    Caches made with ``branches=`` that name SD3 / Flux units run the branch level of those families.
    """
    if caches.branches is not None and caches.branches != ["block"]:
        from ..adapters.mmdit_branches import is_two_stream

        if is_two_stream(model):
            from .soft_branches import soft_branch_forward

            return soft_branch_forward(model, args, w, caches, record=record)
    fn = _registered(model)
    if fn is not None:
        return fn(model, args, w, caches, record=record)
    return branch_soft_forward(model, args, w, caches, record=record)


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
