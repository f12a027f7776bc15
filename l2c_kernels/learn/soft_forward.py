"""The learner's soft forward: one differentiable transformer call with soft caches (router training).

Every unit the router decides (a DiT / PixArt branch, a whole block, an SD3 / Flux unit) is computed; its output
``y`` is mixed with its cache as ``w * y + (1 - w) * cache`` and the mix becomes the new cache, so the cache a unit
would reuse at inference (possibly several steps old) is what the router is trained against. ``w`` is 1 for a unit
with an empty cache (the first step). ``w`` in {0, 1} gives exactly the hard schedule's outputs.

With ``forecast="linear"`` the cache is extrapolated the way a linear-forecast schedule does it: each slot carries
its anchor ``a`` (last computed output), slope ``d`` (per step) and the age ``k`` of the anchor; the reused value
at a step is ``c + d`` (one step on from the previous value ``c``), and a step mixing in a fresh output ``y`` with
weight ``w`` updates ``d <- w (y - a) / k + (1 - w) d``, ``a <- w y + (1 - w) a``, ``k <- 1 + (1 - w) k``. For ``w``
in {0, 1} this is exactly ``y1 + (s - s1) / (s1 - s0) (y1 - y0)`` of the runtime; in between it is
differentiable in ``w`` (:class:`SoftCaches`).

One mixing rule (:class:`_SoftMix`) serves every level; what differs is only how a level's units run, and that is
the runtime's own code wherever the runtime has it:

- **branch level** (DiT / PixArt): the model's block adapter computes each branch, whose mixed output is added
  to the hidden states under its adaLN-Zero gate;
- **block level** (the pattern-table families): on a shadow of the model (the runtime's
  :func:`~l2c_kernels.runtime.block_runtime.shadow_with`: weights shared, the user's model untouched) each block
  is the runtime's stand-in (its order check, binding and output checks), and each stream it returns becomes
  ``in + mix(out - in)`` under the block's one weight (a stream returned as ``None`` stays ``None``);
- **two-stream branch level** (SD3 / SD3.5 / Flux units, opt-in with ``branches=branch_names(model)``): the
  runtime's branch wrappers (modulation, norms, rotary embeddings, the Flux single block's split ``proj_out``)
  driven by a soft unit runner; a unit's raw output (before its gate) is mixed, joint attention's image and
  text outputs in two slots under one weight.

A function registered with :func:`register_soft_forward` for a model class comes first; it has the signature of
:func:`soft_forward` and uses :class:`SoftCaches` the same way.
"""
from __future__ import annotations

import contextlib

import torch

from ..adapters import StepInputs, adapter_for, level_for
from ..adapters.mmdit_branches import branch_names, is_two_stream
from ..adapters.patterns import HIDDEN, find_blocks, pattern_for
from ..runtime.block_runtime import _BlockWrapper, shadow_with
from ..runtime.branch_wrappers import _WRAPPERS
from ..schedule import BLOCK_LEVEL, BLOCK_UNIT, BRANCH_LEVEL, TWO_STREAM_LEVEL
from .soft_caches import SoftCaches
from .units import check_unit_names

#: soft forwards registered for a model class (:func:`register_soft_forward`); they come before the level's own
_SOFT_FORWARDS: dict = {}


def register_soft_forward(model_class_name: str, fn) -> None:
    """Use ``fn(model, args, w, caches, record=None) -> output`` for models of class ``model_class_name``."""
    _SOFT_FORWARDS[model_class_name] = fn


def soft_forward(model, args: dict, w: torch.Tensor | None, caches: SoftCaches,
                 record: list | None = None) -> torch.Tensor:
    """One transformer call (``args``: its keyword arguments); ``w[block, column]`` in [0, 1] is the weight of the
    fresh output (``None``: every unit computed). Returns the output tensor.

    ``record``, if given, collects ``(block, column, fresh output)`` once per unit and call (a block: its image
    stream's residual; joint attention: its first output) for change measurements. The level is the one the
    families registry decides for ``caches.branches`` (:func:`~l2c_kernels.adapters.level_for`); a function
    registered for the model's class comes first.
    """
    fn = _SOFT_FORWARDS.get(type(getattr(model, "original_model", model)).__name__)
    if fn is None:
        fn = {BRANCH_LEVEL: branch_soft_forward, BLOCK_LEVEL: soft_block_forward,
              TWO_STREAM_LEVEL: soft_unit_forward}[level_for(model, caches.branches)]
    return fn(model, args, w, caches, record=record)


class _SoftMix:
    """The one mixing rule of a soft call: unit ``unit``'s fresh output ``y`` (its stream ``stream``) in block ``b``
    mixed with its cache under the weight of the unit's router column; a unit the router does not decide is
    computed as is."""

    def __init__(self, model, level_words: str, per: str, w, caches: SoftCaches, columns: list, num_blocks: int,
                 record):
        shape = [num_blocks, len(columns)]
        cls = type(model).__name__
        if w is not None and (w.dim() != 2 or list(w.shape) != shape):
            names = "" if per == "block" else f" ({list(columns)})"
            raise ValueError(f"w has shape {list(w.shape)}; the {level_words} soft forward of {cls} takes one "
                             f"weight per {per}, {shape}{names}")
        if list(caches.shape) != shape:
            raise ValueError(f"the soft caches were made for a router of {list(caches.shape)} (blocks, columns); "
                             f"the {level_words} soft forward of {cls} needs {shape}")
        self.w, self.caches, self.record = w, caches, record
        self.column = {u: i for i, u in enumerate(columns)}

    def __call__(self, b: int, unit: str, stream: int, y: torch.Tensor, record: bool = True) -> torch.Tensor:
        col = self.column.get(unit)
        if col is None:
            return y
        if self.record is not None and record:
            self.record.append((b, col, y.detach()))
        return self.caches.mix(b, (col, stream), y, None if self.w is None else self.w[b, col])


# --------------------------------------------------------------------------------- branch level (DiT / PixArt)
def branch_soft_forward(model, args: dict, w: torch.Tensor | None, caches: SoftCaches,
                        record: list | None = None) -> torch.Tensor:
    """The branch-level soft forward through the model's block adapter."""
    from .. import ops

    ad = adapter_for(model)
    branches = ad.branches(model)
    mix = _SoftMix(model, "branch-level", "block and branch", w, caches, branches, ad.num_blocks(model), record)
    inputs = StepInputs(args=args)
    with ops.use_backend("torch"):  # plain differentiable PyTorch for the modulation
        h, ctx = ad.prepare(model, inputs)
        for b, block in enumerate(ad.blocks(model)):
            bctx = ad.block_context(block, ctx)
            for name in branches:
                mixed = mix(b, name, 0, ad.compute_branch(block, name, h, bctx, ctx))
                gate = ad.branch_gate(name, bctx)
                h = h + (mixed if gate is None else gate[:, None, :] * mixed)
        return ad.finish(model, h, ctx, inputs)


# --------------------------------------------------------------------------------- on a shadow of the model
class _ShadowState:
    """What the stand-ins of one soft call share (``_enter``'s order check reads fam, refs, next_block)."""

    def __init__(self, fam, refs, mix: _SoftMix):
        self.fam, self.refs, self.mix, self.next_block = fam, refs, mix, 0


def _shadow_forward(model, args: dict, state: _ShadowState, stand_in) -> torch.Tensor:
    out = shadow_with(model, state.fam, state.refs, stand_in)(**args)
    if state.next_block != len(state.refs):
        raise RuntimeError(f"{type(model).__name__}'s forward ran {state.next_block} of its {len(state.refs)} blocks")
    if hasattr(out, "sample"):
        return out.sample
    return out[0] if isinstance(out, (tuple, list)) else out


class _SoftBlock(_BlockWrapper):
    """The runtime's block stand-in, computing its block and mixing each returned stream's residual."""

    def forward(self, *args, **kwargs):
        bound = self._enter(args, kwargs)
        names, single = self._ref.pattern.returns, self._ref.pattern.single_output
        ins = [bound.get(n) for n in names]
        outs = self._outputs(self.block(*args, **kwargs), ins)
        self._check_streams(ins, outs)
        b, mix = self._ref.index, self._state.mix
        mixed = [None if o is None else x + mix(b, BLOCK_UNIT, k, o - x, record=name == HIDDEN)
                 for k, (name, x, o) in enumerate(zip(names, ins, outs))]
        return mixed[0] if single else tuple(mixed)


def soft_block_forward(model, args: dict, w: torch.Tensor | None, caches: SoftCaches,
                       record: list | None = None) -> torch.Tensor:
    """The block-level soft forward (one weight per block, ``w[block, 0]``); ``record`` collects
    ``(block, 0, fresh image-stream residual)``."""
    model = getattr(model, "original_model", model)
    fam = pattern_for(model)
    refs = find_blocks(model, fam)
    state = _ShadowState(fam, refs, _SoftMix(model, "block-level", "block", w, caches, [BLOCK_UNIT], len(refs),
                                             record))
    return _shadow_forward(model, args, state, lambda r: _SoftBlock(r, state))


class _SoftUnitRunner:
    """The learner's counterpart of the runtime's ``_UnitRunner`` (same methods): every unit is computed, its raw
    output mixed with its cache; each stream update returns a new tensor (autograd: no in-place writes)."""

    measuring = False

    def __init__(self, stand_in):
        self.mix, self.block_index = stand_in._state.mix, stand_in._ref.index
        self.recorded: set = set()

    def computes(self, unit: str) -> bool:
        return True

    def stores(self, unit: str) -> bool:
        return True  # a Flux single block's halves stay separate units (never the fused proj_out)

    def counting(self, unit: str):
        return contextlib.nullcontext()

    def add(self, unit: str, stream: int, x: torch.Tensor, y: torch.Tensor, gate) -> torch.Tensor:
        first = unit not in self.recorded
        self.recorded.add(unit)
        mixed = self.mix(self.block_index, unit, stream, y, record=first)
        return x + (mixed if gate is None else gate[:, None, :] * mixed)

    def reuse(self, unit: str, stream: int, x: torch.Tensor, gate) -> torch.Tensor:
        # never called: computes() says True for every unit, so the wrappers never take their reuse path
        assert False, "the soft forward computes every unit; nothing is reused outright"

    def apply(self, unit: str, stream: int, x: torch.Tensor, gate, compute_fn) -> torch.Tensor:
        return self.add(unit, stream, x, compute_fn(), gate)


class _SoftStandIn:
    """Mixed into each runtime branch wrapper class: the block's units through the soft runner."""

    def forward(self, *args, **kwargs):
        bound = self._enter(args, kwargs)
        h, e, temb = self._streams(bound)
        return self._units_forward(_SoftUnitRunner(self), h, e, temb, bound)


_SOFT_WRAPPERS = {name: type(f"_Soft{cls.__name__}", (_SoftStandIn, cls), {}) for name, cls in _WRAPPERS.items()}


def soft_unit_forward(model, args: dict, w: torch.Tensor | None, caches: SoftCaches,
                      record: list | None = None) -> torch.Tensor:
    """The SD3 / Flux unit-level soft forward: ``w[block, j]`` weighs unit ``caches.branches[j]``; a unit a block
    does not have ignores its weight."""
    model = getattr(model, "original_model", model)
    if not is_two_stream(model):
        raise TypeError(f"{type(model).__name__} has no two-stream branch units (SD3Transformer2DModel, "
                        f"FluxTransformer2DModel)")
    names = check_unit_names(model, caches.branches)
    fam = pattern_for(model)
    refs = find_blocks(model, fam)
    state = _ShadowState(fam, refs, _SoftMix(model, "branch-level", "block and unit", w, caches, names, len(refs),
                                             record))
    unknown = sorted({type(r.module).__name__ for r in refs} - set(_SOFT_WRAPPERS))
    if unknown:
        raise TypeError(f"{', '.join(unknown)} has no branch-level units (known: {', '.join(_SOFT_WRAPPERS)}); learn "
                        f"this model at block level (branches=None)")
    all_units = branch_names(model)
    return _shadow_forward(model, args, state, lambda r: _SOFT_WRAPPERS[type(r.module).__name__](r, state, all_units))
