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


class SoftCaches:
    """Per (block, branch) cached outputs carried along one sampling trajectory."""

    def __init__(self, num_blocks: int, num_branches: int, forecast: str = "none", branches: list | None = None):
        """``branches``: the units the router decides when they are not the model's default level (SD3 / Flux
        branch level: e.g. ``["attn1", "ff", "ff_context"]``; :func:`soft_forward` then runs the branch-level
        soft forward of ``soft_branches.py``); None for the default level."""
        if forecast not in ("none", "linear"):
            raise ValueError(f"forecast must be 'none' or 'linear', got {forecast!r}")
        self.forecast = forecast
        self.branches = None if branches is None else list(branches)
        self.values: list[list[torch.Tensor | None]] = [[None] * num_branches for _ in range(num_blocks)]
        # linear forecast state per (block, branch): (anchor, slope, age) or None before the first output
        self.linear: list[list[tuple | None]] = [[None] * num_branches for _ in range(num_blocks)]

    def mix(self, b: int, i: int, y: torch.Tensor, w) -> torch.Tensor:
        """The value branch (b, i) contributes at this step when its fresh output is ``y``, weight ``w``."""
        c = self.values[b][i]
        if self.forecast == "none":
            mixed = y if (c is None or w is None) else w * y + (1 - w) * c
        else:
            st = self.linear[b][i]
            if w is None:  # full compute
                w = 1.0
            if st is None:  # the first output: nothing to extrapolate from yet
                mixed, st = y, (y, torch.zeros_like(y), 1.0)
            else:
                a, d, k = st
                mixed = w * y + (1 - w) * (c + d)
                st = (w * y + (1 - w) * a, w * (y - a) / k + (1 - w) * d, 1.0 + (1 - w) * k)
            self.linear[b][i] = st
        self.values[b][i] = mixed
        return mixed

    def detach_(self) -> "SoftCaches":
        """Cut the graph to earlier steps (step-wise training): values stay, gradients stop here."""
        def d(v):
            return v.detach() if isinstance(v, torch.Tensor) else v

        self.values = [[d(v) for v in row] for row in self.values]
        self.linear = [[None if st is None else tuple(d(e) for e in st) for st in row] for row in self.linear]
        return self


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
