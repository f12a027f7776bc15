"""Branch-level schedules on SD3 / SD3.5 and Flux.1: block wrappers that compute or reuse each unit.

The same shadow mechanism as the block level (:mod:`l2c_kernels.runtime.block_runtime`): the family's
own forward runs on a shallow copy of the model whose block lists hold wrappers around the same block
objects. A wrapper here re-runs its block's forward from the block's submodules, unit by unit (the
units are listed in :mod:`l2c_kernels.adapters.mmdit_branches`):

- the adaLN-Zero modulation (shift / scale / gate vectors) is recomputed from the step's embedding
  every step, and the streams' layer norms wherever a computed unit reads them;
- a computed unit's raw output (before its gate) is added with :func:`ops.gated_residual_`, which
  also writes it to the unit's cache slot when a later step reads it;
- a reused unit adds ``gate * cached`` (:func:`ops.gated_residual_`) or, with a forecast schedule,
  ``gate * sum_j w_j cached_j`` (:func:`ops.forecast_residual_`, one pass);
- joint attention is one unit whose image and text outputs are cached together (text output: none in
  SD3's last block, ``context_pre_only``); a Flux single block's halves are the two column blocks of
  ``proj_out``: ``W_a a`` (``attn1``) and ``W_m m + b`` (``ff``). When both halves compute and neither
  is stored the block runs ``proj_out`` on the concatenation as diffusers does; otherwise each
  computed half runs its own product (the same FLOPs, see ``bench/NOTES.md``);
- a whole-block reuse (``B`` in the plan) re-adds the block's cached residual per stream.

The step, the passes per step and the checks on the forward's block order are the block-level
module's (:class:`BranchCachedTransformer` subclasses it).
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..adapters.mmdit_branches import BLOCK_CLASSES, block_branches, branch_names, is_two_stream
from ..adapters.patterns import BlockPatternError
from ..schedule import ScheduleError
from .block_cache import BlockAction, apply_residuals, store_residuals
from .block_flops import _CUSTOM
from .block_runtime import BlockCachedTransformer, _BlockWrapper, _layout
from .plan import BlockPlan, compile_plans

_PLAIN_BLOCK_REUSE = BlockAction(False, reads=((0, 1.0),))


def _chunks(norm: nn.Module, temb: torch.Tensor, n: int, cls: str, need=None) -> list:
    """The adaLN-Zero vectors of ``norm`` (AdaLayerNormZero: 6, SD3.5's ...ZeroX: 9, ...ZeroSingle: 3).

    ``need``: the indices of the vectors wanted (None: all). The others are not computed and come back as
    None: a reused unit needs only its gate, and the projection is a matrix-vector product whose cost is
    reading the weight, so a block whose units are all reused reads 1/3 of it (the gate rows of each unit,
    contiguous row blocks of ``norm.linear.weight``: views, no copy)."""
    if getattr(norm, "emb", None) is not None or not isinstance(getattr(norm, "linear", None), nn.Linear):
        raise BlockPatternError(f"{cls}.{type(norm).__name__} is not an adaLN-Zero norm driven by temb (it embeds "
                                f"its own timestep or has no linear projection); run this model at block level")
    s = norm.silu(temb)
    if need is None or len(need) == n:
        return list(norm.linear(s).chunk(n, dim=1))
    w, b = norm.linear.weight, norm.linear.bias
    d = w.shape[0] // n
    out = [None] * n
    for k in need:
        out[k] = F.linear(s, w[k * d:(k + 1) * d], None if b is None else b[k * d:(k + 1) * d])
    return out


def _zero_need(attn: bool, mlp: bool) -> set:
    """Which of an AdaLayerNormZero's 6 vectors a stream needs: both gates always, the attention's shift and scale
    (0, 1) if its attention unit computes, the MLP's (3, 4) if its MLP unit does."""
    return {2, 5} | ({0, 1} if attn else set()) | ({3, 4} if mlp else set())


def _modulate(normed: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return normed * (1 + scale[:, None]) + shift[:, None]


def _feed_forward(block, ff: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if getattr(block, "_chunk_size", None) is not None:
        from diffusers.models.attention import _chunked_feed_forward

        return _chunked_feed_forward(ff, x, block._chunk_dim, block._chunk_size)
    return ff(x)


class _UnitRunner:
    """One block's units at one step: add a computed output (storing it if the plan says so) or a reused
    (or forecast) one to a stream, on the pass's caches. Stream 0 is the text stream, 1 the image stream
    (the blocks' return order); a Flux single block has the one joint stream 0."""

    def __init__(self, wrapper: "_BranchWrapper", plan: BlockPlan):
        self.st, self.block_index, self.plan = wrapper._state, wrapper._ref.index, plan
        self.index = wrapper._branch_index
        self.cls = type(wrapper.block).__name__

    @property
    def measuring(self) -> bool:
        """FLOPs are being counted (``measure_branch_flops``): every unit runs on its own."""
        return getattr(self.st, "flops", None) is not None

    def computes(self, unit: str) -> bool:
        return self.plan.compute[self.index[unit]]

    def stores(self, unit: str) -> bool:
        i = self.index[unit]
        return self.plan.compute[i] and self.plan.store[i]

    @contextlib.contextmanager
    def counting(self, unit: str):
        """Count the FLOPs of what runs inside into ``state.flops`` (only while measuring)."""
        flops = getattr(self.st, "flops", None)
        if flops is None:
            yield
            return
        from torch.utils.flop_counter import FlopCounterMode

        fc = FlopCounterMode(display=False, custom_mapping=_CUSTOM)
        with fc:
            yield
        flops[self.block_index][self.index[unit]] += float(fc.get_total_flops())

    def add(self, unit: str, stream: int, x: torch.Tensor, y: torch.Tensor, gate) -> torch.Tensor:
        """``x += gate * y`` for a computed ``y``, written to the unit's cache slot if a later step reads it; returns
        the updated stream (``x`` itself: the wrappers rebind to what the runner returns, so a soft runner for the
        learner can return a new tensor instead)."""
        i = self.index[unit]
        cache = None
        if self.plan.store[i]:
            key = (self.block_index, i)
            cache = self.st.caches.buffer(key, stream, self.plan.slot[i], y)
            self.st.caches.filled.add((key, self.plan.slot[i]))
        ops.gated_residual_(x, y, gate, cache)
        return x

    def reuse(self, unit: str, stream: int, x: torch.Tensor, gate) -> torch.Tensor:
        """``x += gate * (cached or forecast output of the unit)``."""
        i = self.index[unit]
        key, reads = (self.block_index, i), [(j, w) for j, w in enumerate(self.plan.weights[i]) if w]
        caches = self.st.caches
        if not reads or any((key, j) not in caches.filled for j, _ in reads):
            raise ScheduleError(f"step {self.st.step} reuses {unit} of block {self.block_index} ({self.cls}) but its "
                                f"cache was not filled in this generation (start at step 0, or call reset())")
        ys = [caches.read(key, stream, j, x, self.st.step) for j, _ in reads]
        if len(reads) == 1 and reads[0][1] == 1.0:
            ops.gated_residual_(x, ys[0], gate)
            return x
        c = [w for _, w in reads] + [0.0] * (3 - len(reads))
        ops.forecast_residual_(x, ys[0], ys[1] if len(ys) > 1 else ys[0], ys[2] if len(ys) > 2 else None, gate,
                               c[0], c[1], c[2])
        return x

    def apply(self, unit: str, stream: int, x: torch.Tensor, gate, compute_fn) -> torch.Tensor:
        """The unit's output added to ``x``: computed by ``compute_fn()`` or reused; returns the updated stream."""
        if self.computes(unit):
            with self.counting(unit):
                y = compute_fn()
            return self.add(unit, stream, x, y, gate)
        return self.reuse(unit, stream, x, gate)


class UnitKind(NamedTuple):
    """The static shape of one two-stream block's work at one step (a ``torch.compile`` guard: one graph per kind
    and block structure), per unit of the block: computed, stored, or how many cached outputs a reuse sums."""

    compute: tuple[bool, ...]
    store: tuple[bool, ...]
    reads: tuple[int, ...]   # 0 computed, 1 plain reuse, 2-3 a forecast


class _PreparedUnits:
    """The compiled path's unit runner: the host work of :class:`_UnitRunner` (which buffers, whether they were
    filled) done before the call, so the traced block sees only its :class:`UnitKind`, the cache buffers and a
    forecast's weights as 0-d tensors (inputs of the graph, not constants: one graph serves every step of a kind)."""

    measuring = False

    def __init__(self, index: dict, kind: UnitKind, bufs: dict, weights: dict):
        self.index, self.kind, self.bufs, self.weights = index, kind, bufs, weights

    def computes(self, unit: str) -> bool:
        return self.kind.compute[self.index[unit]]

    def stores(self, unit: str) -> bool:
        return self.kind.store[self.index[unit]]

    def counting(self, unit: str):
        return contextlib.nullcontext()

    def add(self, unit: str, stream: int, x, y, gate):
        ops.gated_residual_(x, y, gate, self.bufs.get((unit, stream)))
        return x

    def reuse(self, unit: str, stream: int, x, gate):
        ys = self.bufs[(unit, stream)]
        if self.kind.reads[self.index[unit]] == 1:
            ops.gated_residual_(x, ys[0], gate)
            return x
        v = ys[0] * self.weights[unit][0]   # tensor arithmetic the compiler fuses
        for y, w in zip(ys[1:], self.weights[unit][1:]):
            v = v + y * w
        return x.addcmul_(gate.unsqueeze(1), v)

    def apply(self, unit: str, stream: int, x, gate, compute_fn):
        return self.add(unit, stream, x, compute_fn(), gate) if self.computes(unit) else self.reuse(unit, stream, x,
                                                                                                    gate)


class _BranchWrapper(_BlockWrapper):
    """Stands in for one two-stream block: whole-block reuse, or the block's forward unit by unit."""

    def __init__(self, ref, state, names: list[str]):
        super().__init__(ref, state)
        object.__setattr__(self, "_branch_index", {b: i for i, b in enumerate(names)})
        object.__setattr__(self, "_units", block_branches(ref.module))
        # per schedule branch: whether this block has the unit (one it lacks is neither computed nor read)
        object.__setattr__(self, "_own", tuple(n in self._units for n in names))

    def forward(self, *args, **kwargs):
        bound = self._enter(args, kwargs)
        through = self._outside(bound)
        if through is not None:
            return through
        st, ref = self._state, self._ref
        h, e, temb = self._streams(bound)
        plan: BlockPlan = st.actions[ref.index]
        if plan.reuse_block:
            return tuple(apply_residuals(st.caches, ref.index, _PLAIN_BLOCK_REUSE, [e, h], st.step))
        saved = [e.clone(), h.clone()] if plan.store_delta else None
        if st.compiled:
            run = self._prepared(plan, h, e)
            st.kinds_run.add((self._structure(), run.kind, _layout([e, h])))
            out = st.unit_work(self.UNITS, self.block, self._units, run, h, e, temb, bound)
        else:
            out = self._units_forward(_UnitRunner(self, plan), h, e, temb, bound)
        if plan.store_delta:
            store_residuals(st.caches, ref.index, 0, list(out), saved)
        return out

    def _streams(self, bound: dict) -> tuple:
        """``(hidden_states, encoder_hidden_states, temb)`` of the block's call, checked to be tensors."""
        h, e, temb = bound.get("hidden_states"), bound.get("encoder_hidden_states"), bound.get("temb")
        for n, x in (("hidden_states", h), ("encoder_hidden_states", e), ("temb", temb)):
            if not isinstance(x, torch.Tensor):
                raise BlockPatternError(f"{type(self.block).__name__} argument {n!r} is a {type(x).__name__}, not a "
                                        f"tensor: the branch-level wrapper needs both streams and temb")
        return h, e, temb

    def _prepared(self, plan: BlockPlan, h, e) -> _PreparedUnits:
        """The host side of this block's units at this step: the buffers a computed unit writes (allocated like its
        stream, marked filled) and a reused one reads (checked filled), and the forecast weights as tensors."""
        st, b, index = self._state, self._ref.index, self._branch_index
        caches, streams = st.caches, self.STREAMS(self.block, e, h)
        bufs, weights, reads = {}, {}, [0] * len(index)
        for unit in self._units:
            i = index[unit]
            key = (b, i)
            if plan.compute[i]:
                if plan.store[i]:
                    caches.filled.add((key, plan.slot[i]))
                    for k, shape in streams[unit]:
                        bufs[(unit, k)] = caches.buffer(key, k, plan.slot[i], e, shape)
                continue
            rd = plan.reads(i)
            if not rd or any((key, j) not in caches.filled for j in rd):
                raise ScheduleError(f"step {st.step} reuses {unit} of block {b} ({type(self.block).__name__}) but "
                                    f"its cache was not filled in this generation (start at step 0, or call reset())")
            for k, shape in streams[unit]:
                bufs[(unit, k)] = tuple(caches.read(key, k, j, shape, st.step) for j in rd)
            w = tuple(plan.weights[i][j] for j in rd)
            reads[i] = 1 if w == (1.0,) else max(2, len(w))
            if reads[i] > 1:
                weights[unit] = st.weight_tensors(w, e)
        own = self._own
        kind = UnitKind(tuple(o and c for o, c in zip(own, plan.compute)),
                        tuple(o and c and s for o, c, s in zip(own, plan.compute, plan.store)), tuple(reads))
        return _PreparedUnits(index, kind, bufs, weights)

    UNITS = None   # the block's forward unit by unit: joint_units or flux_single_units
    STREAMS = None  # (block, e, h) -> per unit, the (stream, shape) pairs its outputs add to

    def _units_forward(self, run, h, e, temb, bound):
        """The block's forward unit by unit through ``run`` (the runtime's :class:`_UnitRunner`, the compiled
        path's :class:`_PreparedUnits` or the learner's soft runner: the same methods); every stream update is
        rebound to what ``run`` returns."""
        return self.UNITS(self.block, self._units, run, h, e, temb, bound)


def joint_units(blk, units: tuple, run, h, e, temb, bound):
    """SD3 / SD3.5 ``JointTransformerBlock`` and Flux.1 ``FluxTransformerBlock`` unit by unit (the same two-stream
    layout; SD3 may have ``attn2`` and ``context_pre_only``, Flux passes rotary embeddings to its attention):
    ``units`` the block's units, ``run`` a unit runner; returns ``(encoder_hidden_states, hidden_states)``."""
    cls = type(blk).__name__
    jak = dict(bound.get("joint_attention_kwargs") or {})
    dual = "attn2" in units
    pre_only = bool(getattr(blk, "context_pre_only", False))
    a1, f1 = run.computes("attn1"), run.computes("ff")
    need = _zero_need(a1, f1)
    if dual:
        need |= {8} | ({6, 7} if run.computes("attn2") else set())
    c = _chunks(blk.norm1, temb, 9 if dual else 6, cls, need)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = c[:6]
    h = h.clone()
    e_out = None if pre_only else e.clone()
    if not pre_only:
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = _chunks(
            blk.norm1_context, temb, 6, cls, _zero_need(a1, run.computes("ff_context")))
    nh = blk.norm1.norm(bound["hidden_states"]) if run.computes("attn1") or (dual and run.computes("attn2")) \
        else None

    # joint attention: one unit, image (stream 1) and text (stream 0) outputs
    if run.computes("attn1"):
        with run.counting("attn1"):
            ne = (blk.norm1_context(e, temb) if pre_only
                  else _modulate(blk.norm1_context.norm(e), c_shift_msa, c_scale_msa))
            kw = dict(hidden_states=_modulate(nh, shift_msa, scale_msa), encoder_hidden_states=ne, **jak)
            if "image_rotary_emb" in bound:
                kw["image_rotary_emb"] = bound.get("image_rotary_emb")
            outs = blk.attn(**kw)
            if not isinstance(outs, (tuple, list)) or len(outs) != 2:
                raise BlockPatternError(f"{cls}.attn returned {len(outs) if isinstance(outs, (tuple, list)) else 1}"
                                        f" outputs; the branch-level wrapper handles the image and text outputs "
                                        f"only (IP-adapter attention runs at block level)")
        h = run.add("attn1", 1, h, outs[0], gate_msa)
        if not pre_only:
            e_out = run.add("attn1", 0, e_out, outs[1], c_gate_msa)
    else:
        h = run.reuse("attn1", 1, h, gate_msa)
        if not pre_only:
            e_out = run.reuse("attn1", 0, e_out, c_gate_msa)

    if dual:  # SD3.5: image self-attention on the block input's norm, its own modulation
        shift_msa2, scale_msa2, gate_msa2 = c[6:9]
        h = run.apply("attn2", 1, h, gate_msa2,
                      lambda: blk.attn2(hidden_states=_modulate(nh, shift_msa2, scale_msa2), **jak))

    h = run.apply("ff", 1, h, gate_mlp,
                  lambda: _feed_forward(blk, blk.ff, _modulate(blk.norm2(h), shift_mlp, scale_mlp)))
    if not pre_only:
        e_out = run.apply("ff_context", 0, e_out, c_gate_mlp,
                          lambda: _feed_forward(blk, blk.ff_context,
                                                _modulate(blk.norm2_context(e_out), c_shift_mlp, c_scale_mlp)))
        if e_out.dtype == torch.float16 and cls == "FluxTransformerBlock":
            e_out = e_out.clip(-65504, 65504)
    return e_out, h


def flux_single_units(blk, units: tuple, run, h, e, temb, bound):
    """Flux.1 ``FluxSingleTransformerBlock``: attention and MLP in parallel on the joint stream, one ``proj_out``;
    the units are its two column blocks (see the module docstring)."""
    cls = type(blk).__name__
    text_len = e.shape[1]
    x = torch.cat([e, h], dim=1)  # the joint stream (a new tensor: updated in place below)
    want_a, want_m = run.computes("attn1"), run.computes("ff")
    shift, scale, gate = _chunks(blk.norm, temb, 3, cls, None if want_a or want_m else (2,))
    dim = blk.proj_out.out_features
    w, b = blk.proj_out.weight, blk.proj_out.bias
    jak = dict(bound.get("joint_attention_kwargs") or {})
    nx = _modulate(blk.norm.norm(x), shift, scale) if want_a or want_m else None

    def attn_half():
        return blk.attn(hidden_states=nx, image_rotary_emb=bound.get("image_rotary_emb"), **jak)

    def mlp_half():
        return blk.act_mlp(blk.proj_mlp(nx))

    if want_a and want_m and not run.stores("attn1") and not run.stores("ff") and not run.measuring:
        # both halves, nothing cached: diffusers' own arithmetic (one product on the concatenation)
        y = blk.proj_out(torch.cat([attn_half(), mlp_half()], dim=2))
        ops.gated_residual_(x, y, gate)
    else:
        x = run.apply("attn1", 0, x, gate, lambda: F.linear(attn_half(), w[:, :dim]))
        x = run.apply("ff", 0, x, gate, lambda: F.linear(mlp_half(), w[:, dim:], b))
    if x.dtype == torch.float16:
        x = x.clip(-65504, 65504)
    return x[:, :text_len], x[:, text_len:]


def _joint_streams(blk, e, h) -> dict:
    """Joint attention adds to the image (1) and, unless ``context_pre_only``, the text (0) stream; ``attn2`` and
    ``ff`` to the image stream, ``ff_context`` to the text stream."""
    img, txt = (1, h.shape), (0, e.shape)
    pre_only = bool(getattr(blk, "context_pre_only", False))
    return {"attn1": (img,) if pre_only else (img, txt), "attn2": (img,), "ff": (img,), "ff_context": (txt,)}


def _single_streams(blk, e, h) -> dict:
    """Both halves add to the one joint stream (text then image tokens)."""
    joint = (0, torch.Size((e.shape[0], e.shape[1] + h.shape[1], *e.shape[2:])))
    return {"attn1": (joint,), "ff": (joint,)}


class _JointWrapper(_BranchWrapper):
    UNITS, STREAMS = staticmethod(joint_units), staticmethod(_joint_streams)


class _FluxSingleWrapper(_BranchWrapper):
    UNITS, STREAMS = staticmethod(flux_single_units), staticmethod(_single_streams)


_WRAPPERS = {"JointTransformerBlock": _JointWrapper, "FluxTransformerBlock": _JointWrapper,
             "FluxSingleTransformerBlock": _FluxSingleWrapper}


class BranchCachedTransformer(BlockCachedTransformer):
    """A SD3 / SD3.5 / Flux.1 transformer that follows a branch-level schedule (units ``attn1``, ``attn2``,
    ``ff``, ``ff_context``; see :mod:`l2c_kernels.adapters.mmdit_branches`). Same forward signature and
    outputs as the model, weights shared, the model unmodified; steps and passes as in
    :class:`~l2c_kernels.runtime.block_runtime.BlockCachedTransformer`."""

    @staticmethod
    def _check_schedule(fam, schedule) -> None:
        if schedule.is_block_level:
            raise ScheduleError("a block-level schedule runs on BlockCachedTransformer (compile_schedule picks it)")
        if schedule.attn2_cache == "cfg_mean":
            raise ScheduleError(f"T-GATE (attn2_cache 'cfg_mean') cannot run on {fam.model_class}: it uses joint "
                                f"attention over text and image tokens, there is no cross-attention to cache "
                                f"(its 'attn2' is SD3.5's image self-attention)")

    @staticmethod
    def _make_actions(schedule) -> list:
        return [p.blocks for p in compile_plans(schedule)]

    def _wrapper(self, ref, state) -> nn.Module:
        cls = type(ref.module).__name__
        if cls not in _WRAPPERS:
            raise BlockPatternError(f"{cls} has no branch-level wrapper (known: {', '.join(BLOCK_CLASSES)})")
        return _WRAPPERS[cls](ref, state, self.schedule.branches)


def measure_branch_flops(model, *args, **kwargs) -> list[list[float]]:
    """FLOPs of every unit of every block (``[block][branch]``, 0 where a unit does not apply) for the call
    ``model(*args, **kwargs)``, counted with FlopCounterMode on the units' own computations (what a reuse
    skips). Pass it as ``unit_branch_flops`` to :meth:`Schedule.from_mask` for budgets by counted FLOPs."""
    from ..schedule import Schedule

    model = getattr(model, "original_model", model)
    if not is_two_stream(model):
        raise TypeError(f"{type(model).__name__} has no two-stream branch units (SD3Transformer2DModel, "
                        f"FluxTransformer2DModel)")
    names = branch_names(model)
    fast = BranchCachedTransformer(model, Schedule.full(model, [0], branches=names))
    st = fast._state
    st.flops = [[0.0] * len(names) for _ in st.refs]
    fast.set_step(0)
    try:
        fast(*args, **kwargs)
    finally:
        out, st.flops = st.flops, None
    return out
