"""A differentiable transformer call with soft *branch* caches on SD3 / SD3.5 and Flux.1 (two-stream blocks).

Branch level on these families is opt-in (``learn_schedule(..., branches=branch_names(model))``); its units are
those of :mod:`l2c_kernels.adapters.mmdit_branches`: joint attention (``attn1``, its image and text outputs one
unit), SD3.5's ``attn2``, ``ff``, ``ff_context``, and a Flux single block's two column blocks of ``proj_out``
(``attn1``: ``W_a a``; ``ff``: ``W_m m + b``). The router trains against the soft version of the runtime:
every unit is computed and its raw output (before its adaLN-Zero gate) becomes

    y_soft = w * y_fresh + (1 - w) * cached,        stream += gate * y_soft

with ``w = w[block, branch]``; ``y_soft`` is the new cache (per stream: joint attention caches its image and
text outputs in two slots under one weight), so what a unit would reuse at inference, possibly several steps
old, is what the router sees. ``w`` in {0, 1} gives the hard schedule's outputs: a computed unit, or
``gate * cached`` with this step's gate. A ``"linear"`` :class:`~l2c_kernels.learn.soft_forward.SoftCaches`
extrapolates the cache as the runtime's linear forecast does.

Nothing of the blocks' arithmetic is written here: the stand-ins are the runtime's own branch wrappers
(:mod:`l2c_kernels.runtime.branch_wrappers`: modulation, norms, rotary embeddings, the Flux single block's
split ``proj_out``) driven by a soft unit runner instead of the runtime's one, on a shadow of the model
(:func:`~l2c_kernels.runtime.block_runtime.shadow_with`: weights shared, the user's model untouched).

:func:`learning_units` says what the router's columns are and what each (block, unit) costs, counted on one
real call at the denoiser's shapes, for every level the learner runs.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..adapters import adapter_for
from ..adapters.mmdit_branches import applicable, branch_names, is_two_stream
from ..adapters.patterns import find_blocks, pattern_for
from ..runtime.block_runtime import shadow_with
from ..runtime.branch_wrappers import _WRAPPERS
from ..schedule import BLOCK_UNIT, BRANCH_LEVEL, TWO_STREAM_LEVEL
from .soft_caches import SoftCaches


class _SoftState:
    """What the stand-ins of one soft call share (the names ``_enter``'s order check reads: fam, refs, next_block)."""

    def __init__(self, fam, refs, w, caches: SoftCaches, names: list[str], record):
        self.fam, self.refs, self.next_block = fam, refs, 0
        self.w, self.caches, self.record = w, caches, record
        self.column = {b: i for i, b in enumerate(names)}  # unit -> router column


class _SoftUnitRunner:
    """The learner's counterpart of the runtime's ``_UnitRunner`` (same methods): every unit is computed, its raw
    output mixed with its cache; each stream update returns a new tensor (autograd: no in-place writes)."""

    measuring = False

    def __init__(self, stand_in):
        self.st, self.block_index = stand_in._state, stand_in._ref.index
        self.recorded: set = set()

    def computes(self, unit: str) -> bool:
        return True

    def stores(self, unit: str) -> bool:
        return True  # a Flux single block's halves stay separate units (never the fused proj_out)

    def counting(self, unit: str):
        return contextlib.nullcontext()

    def add(self, unit: str, stream: int, x: torch.Tensor, y: torch.Tensor, gate) -> torch.Tensor:
        st, b = self.st, self.block_index
        col = st.column.get(unit)
        if col is None:  # a unit the router does not decide: always computed
            mixed = y
        else:
            if st.record is not None and unit not in self.recorded:
                self.recorded.add(unit)
                st.record.append((b, col, y.detach()))
            _ensure_slots(st.caches, b, 2 * len(st.column))
            mixed = st.caches.mix(b, 2 * col + stream, y, None if st.w is None else st.w[b, col])
        return x + (mixed if gate is None else gate[:, None, :] * mixed)

    def reuse(self, unit: str, stream: int, x: torch.Tensor, gate) -> torch.Tensor:
        # never called: computes() says True for every unit, so the wrappers never take their reuse path
        assert False, "the soft forward computes every unit; nothing is reused outright"

    def apply(self, unit: str, stream: int, x: torch.Tensor, gate, compute_fn) -> torch.Tensor:
        return self.add(unit, stream, x, compute_fn(), gate)


def _ensure_slots(caches: SoftCaches, block: int, n: int) -> None:
    """Two cache slots per unit (text stream 0, image stream 1) in ``block``'s row."""
    for rows in (caches.values, caches.linear):
        while len(rows) <= block:
            rows.append([])
        row = rows[block]
        while len(row) < n:
            row.append(None)


class _SoftStandIn:
    """Mixed into each runtime wrapper class: the block's units through the soft runner."""

    def forward(self, *args, **kwargs):
        bound = self._enter(args, kwargs)
        h, e, temb = self._streams(bound)
        return self._units_forward(_SoftUnitRunner(self), h, e, temb, bound)


_SOFT_WRAPPERS = {name: type(f"_Soft{cls.__name__}", (_SoftStandIn, cls), {}) for name, cls in _WRAPPERS.items()}


def _check_names(model, names) -> list[str]:
    have = branch_names(model)
    names = list(names)
    unknown = [b for b in names if b not in have]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"branches {names} are not a subset of {type(model).__name__}'s units {have}")
    return names


def soft_branch_forward(model, args: dict, w: torch.Tensor | None, caches: SoftCaches,
                        record: list | None = None) -> torch.Tensor:
    """One SD3 / Flux transformer call (``args``: its keyword arguments) with soft unit caches; returns the output
    tensor. ``w[block, j]`` in [0, 1] is the weight of the fresh output of unit ``caches.branches[j]`` (``None``:
    all computed); a unit a block does not have ignores its weight. ``record``, if given, collects
    ``(block, j, fresh output)`` (joint attention: its image output)."""
    model = getattr(model, "original_model", model)
    if not is_two_stream(model):
        raise TypeError(f"{type(model).__name__} has no two-stream branch units (SD3Transformer2DModel, "
                        f"FluxTransformer2DModel)")
    names = _check_names(model, caches.branches)
    fam = pattern_for(model)
    refs = find_blocks(model, fam)
    if w is not None and (w.dim() != 2 or tuple(w.shape) != (len(refs), len(names))):
        raise ValueError(f"w has shape {list(w.shape)}; the branch-level soft forward of {type(model).__name__} "
                         f"takes one weight per block and unit, [{len(refs)}, {len(names)}] ({names})")
    unknown = sorted({type(r.module).__name__ for r in refs} - set(_SOFT_WRAPPERS))
    if unknown:
        raise TypeError(f"{', '.join(unknown)} has no branch-level units (known: {', '.join(_SOFT_WRAPPERS)}); learn "
                        f"this model at block level (branches=None)")
    state = _SoftState(fam, refs, w, caches, names, record)
    all_units = branch_names(model)
    shadow = shadow_with(model, fam, refs, lambda r: _SOFT_WRAPPERS[type(r.module).__name__](r, state, all_units))
    out = shadow(**args)
    if state.next_block != len(refs):
        raise RuntimeError(f"{type(model).__name__}'s forward ran {state.next_block} of its {len(refs)} blocks")
    if hasattr(out, "sample"):
        return out.sample
    return out[0] if isinstance(out, (tuple, list)) else out


# ---------------------------------------------------------------------------------------------- what the router learns
@dataclass
class LearningUnits:
    """The router's columns for one model and level, and what each (block, unit) costs."""

    branches: list | None          # what was asked: None = the model's default level
    names: list                    # the router's columns (branch names, or ["block"])
    num_blocks: int
    cost: torch.Tensor             # [blocks, columns] FLOPs per model-batch sample; 0 where a unit does not apply
    branch_flops: dict             # per column: mean FLOPs over the blocks that have it
    schedule_kwargs: dict = field(default_factory=dict)  # for Schedule.from_mask: branches=, unit_(branch_)flops=
    level: str = BRANCH_LEVEL      # the level the families registry decided (l2c_kernels.schedule.LEVELS)


def learning_units(den, branches=None) -> LearningUnits:
    """What the router of ``den``'s transformer learns: ``branches=None`` the model's default level (DiT / PixArt:
    their branches, the pattern-table families: whole blocks), ``["block"]`` block level, or a list of SD3 / Flux
    units (e.g. ``branch_names(model)``) for branch level on two-stream blocks.

    Costs: SD3 / Flux (either level) are counted with FlopCounterMode on one real call at the denoiser's latent
    shape and conditioning (``measure_branch_flops`` / ``measure_block_flops``), so a budget is a fraction of the
    FLOPs the schedule really removes at the real image and text token counts, the same number
    :meth:`Schedule.flops_removed_fraction` reports; other families keep their adapter's per-branch costs."""
    model = getattr(den.transformer, "original_model", den.transformer)
    ad = adapter_for(model, branches)
    level, nb = ad.level, ad.num_blocks(model)
    if branches is not None and level != TWO_STREAM_LEVEL and list(branches) != list(ad.branches(model)):
        raise ValueError(f"branches {list(branches)}: {type(model).__name__} learns its branches {ad.branches(model)}")
    if not is_two_stream(model):   # costs from the adapter
        names = list(ad.branches(model))
        flops = ad.branch_flops(model, tokens=den.image_tokens, text_tokens=den.text_tokens or 8)
        cost = torch.tensor([[float(flops[b]) for b in names]] * nb)
        return LearningUnits(None if branches is None else list(branches), names, nb, cost, flops,
                             dict(branches=list(branches)) if branches is not None else {}, level)
    args = _one_call(den)   # SD3 / Flux: costs counted on a real call at the real token counts
    if level == TWO_STREAM_LEVEL:
        from ..runtime.branch_wrappers import measure_branch_flops

        names = _check_names(model, branches)
        all_units = branch_names(model)
        counted = measure_branch_flops(model, **args)
        cols = [all_units.index(b) for b in names]
        per = float(args["hidden_states"].shape[0])
        cost = torch.tensor([[row[c] / per for c in cols] for row in counted])
        app = applicable(model)
        flops = {b: float(sum(cost[k, j] for k in range(nb) if app[k][all_units.index(b)]) /
                          max(1, sum(app[k][all_units.index(b)] for k in range(nb))))
                 for j, b in enumerate(names)}
        ubf = [[row[i] / per for i in range(len(all_units))] for row in counted]
        return LearningUnits(names, names, nb, cost, flops, dict(branches=names, unit_branch_flops=ubf), level)
    from ..runtime.block_flops import measure_block_flops

    per = float(args["hidden_states"].shape[0])
    counted = [f / per for f in measure_block_flops(model, **args)]
    cost = torch.tensor([[f] for f in counted])
    return LearningUnits(None if branches is None else [BLOCK_UNIT], [BLOCK_UNIT], nb, cost,
                         {BLOCK_UNIT: sum(counted) / len(counted)},
                         dict(unit_flops=counted, **({} if branches is None else dict(branches=[BLOCK_UNIT]))), level)


def _one_call(den) -> dict:
    """The keyword arguments of the denoiser's first model call (noise of seed 0, first timestep)."""
    sched = den.scheduler(2)
    x = den.noise(0) * getattr(sched, "init_noise_sigma", 1.0)
    return den.model_args(den.batch(x.to(den.device)), sched.timesteps[0])
