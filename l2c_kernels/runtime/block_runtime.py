"""The drop-in module for block-level schedules: any family in the block pattern table (Flux, SD3, Wan, ...).

No code of the family is rewritten and the user's model is not modified: the module keeps a *shadow*
of the model -- a shallow copy of the top module whose block lists are replaced by wrappers around
the same block objects (parameters, buffers and every other submodule shared). The family's own
forward runs on the shadow; each wrapper either calls its block (storing the block's residual
``out - in`` per stream when a later step reads it, :func:`ops.residual_delta_store_`) or returns
its inputs plus the cached residual (:func:`ops.residual_apply_`, or :func:`ops.forecast_residual_`
for a forecast schedule). Every call checks that the forward ran each block once, in order, and the
first call of each block checks the pattern (see :mod:`l2c_kernels.adapters.patterns`).

A wrapper does the host side of its block's work (which buffers, whether they were filled) and hands the
tensor side to :func:`~l2c_kernels.runtime.block_work.block_work`, compiled per kind with ``torch_compile``.
Steps and passes: :mod:`~l2c_kernels.runtime.block_steps`; CUDA graphs of whole steps:
:mod:`~l2c_kernels.runtime.block_graphs`.
"""
from __future__ import annotations

import copy
import inspect

import torch
from torch import nn

from ..adapters.patterns import BlockPatternError, BlockRef, FamilyPattern, find_blocks, pattern_for
from ..schedule import Schedule, ScheduleError
from .drop_in import DropInModule
from .block_cache import BlockAction, BlockCaches, block_actions, block_plans, reuse_kind, store_residuals
from .block_flops import step_flops
from .block_graphs import BlockGraphs
from .block_steps import BlockSteps
from .block_work import BlockKind, block_work, compiled_work, unit_work
from .plan import compile_plans


class _RunState:
    """What the wrappers of one compiled model share during a call."""

    def __init__(self, fam: FamilyPattern, refs: list[BlockRef]):
        self.fam, self.refs = fam, refs
        self.actions: tuple[BlockAction, ...] = ()
        self.caches: BlockCaches | None = None
        self.step = 0
        self.next_block = 0
        self.checked: set[int] = set()       # blocks whose pattern was checked on a real call
        self.clone_inputs: set[int] = set()  # blocks found to modify their inputs in place
        self.none_out: dict[int, tuple] = {}  # block -> which returned streams are None (seen on its first call)
        self.work = block_work               # the block work function (compiled per kind with torch_compile)
        self.compiled = False
        self.kinds_run: set = set()          # (block structure, kind) pairs run on the compiled path
        self.keep: range | None = None       # (AsyncDiff components) blocks outside it pass their streams through
        self._wt: dict = {}

    def weight_tensors(self, weights: tuple, like: torch.Tensor) -> tuple:
        """A forecast's weights as 0-d tensors (inputs of the compiled graph), made once per weights and device."""
        key = (weights, like.dtype, like.device)
        wt = self._wt.get(key)
        if wt is None:
            wt = self._wt[key] = tuple(torch.tensor(w, dtype=like.dtype, device=like.device) for w in weights)
        return wt


class BlockStandIn(nn.Module):
    """Stands in for one block in a shadow's block list (the runtime's and the learner's soft one): holds the
    block (its attributes read through), its :class:`BlockRef`, the state its shadow shares and its signature."""

    def __init__(self, ref: BlockRef, state):
        super().__init__()
        self.block = ref.module
        object.__setattr__(self, "_ref", ref)
        object.__setattr__(self, "_state", state)
        object.__setattr__(self, "_sig", inspect.signature(ref.module.forward))

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


def shadow_with(model: nn.Module, fam: FamilyPattern, refs: list[BlockRef], stand_in) -> nn.Module:
    """A shallow copy of ``model`` whose block lists hold ``stand_in(ref)`` for each block (everything else,
    parameters included, shared; ``model`` itself untouched)."""
    shadow = copy.copy(model)
    mods = dict(model._modules)
    for name in fam.block_lists:
        mods[name] = nn.ModuleList([stand_in(r) for r in refs if r.list_name == name])
    object.__setattr__(shadow, "_modules", mods)
    return shadow


class _BlockWrapper(BlockStandIn):
    """Stands in for one block in the runtime's shadow: computes it or re-adds its cached residual."""

    def forward(self, *args, **kwargs):
        bound = self._enter(args, kwargs)
        through = self._outside(bound)
        return through if through is not None else self._run(bound, args, kwargs)

    def _outside(self, bound):
        """None, or -- outside the running component (:class:`~l2c_kernels.parallel.runners.BlockCachedRunner`) -- the
        block's streams unchanged, in its return order: it then runs, stores and reads nothing."""
        keep = self._state.keep
        if keep is None or self._ref.index in keep:
            return None
        return self._ref.pattern.passed_through(bound)

    def _enter(self, args, kwargs) -> dict:
        """Check that the forward runs this block next (in order, once) and bind its arguments."""
        st, ref = self._state, self._ref
        if ref.index != st.next_block:
            exp = st.refs[st.next_block] if st.next_block < len(st.refs) else None
            raise BlockPatternError(
                f"{st.fam.model_class}'s forward ran {ref.list_name}[{ref.list_index}] when "
                f"{f'{exp.list_name}[{exp.list_index}]' if exp else 'no further block'} was expected; the pattern "
                f"table says the blocks of {list(st.fam.block_lists)} run once each, in order")
        st.next_block += 1
        try:
            return self._sig.bind(*args, **kwargs).arguments
        except TypeError as e:
            raise BlockPatternError(f"{type(self.block).__name__} was called with arguments its forward does not "
                                    f"take: {e}") from None

    def _run(self, bound, args, kwargs):
        st, ref = self._state, self._ref
        names = ref.pattern.returns
        ins = [bound.get(n) for n in names]
        for n, x in zip(names, ins):
            if x is not None and not isinstance(x, torch.Tensor):
                raise BlockPatternError(f"{type(self.block).__name__} argument {n!r} is a {type(x).__name__}, "
                                        f"not a tensor: the block pattern does not fit")
        i, action, single = ref.index, st.actions[ref.index], ref.pattern.single_output
        if action.compute and i not in st.checked:
            if not st.compiled:
                return self._probe(action, ins, args, kwargs)
            self._probe(None, ins, args, kwargs)  # checked eagerly once; the step's kind then compiles now, so
            # the first generation compiles every kind the later ones run
        weights = wt = ()
        if action.compute:
            bufs = st.caches.store_buffers(i, action.slot, ins, st.none_out[i]) if action.store else ()
            kind = BlockKind(True, action.store, 0, single, i in st.clone_inputs, st.compiled)
        else:
            bufs = st.caches.reuse_buffers(i, action, ins, st.step)
            kind = reuse_kind(action, single, st.compiled)
            weights = tuple(w for _, w in action.reads)
            if st.compiled and kind.reads > 1:
                wt = st.weight_tensors(weights, next(x for x in ins if x is not None))
        if st.compiled:
            st.kinds_run.add((self._structure() if kind.compute else None, kind, _layout(ins),
                              tuple(b is None for b in bufs)))
        return st.work(self.block, args, kwargs, ins, kind, bufs, weights, wt)

    def _structure(self) -> tuple:
        """What tells this block's compiled graphs from another's: its class and its non-module attributes
        that change the traced code (e.g. SD3's last block has ``context_pre_only``, SD3.5's dual attention
        ``attn2``). A reuse does not run the block: blocks of every class share its graph."""
        b = self.block
        return (type(b).__name__, getattr(b, "context_pre_only", None), "attn2" in b._modules)

    def _probe(self, action: BlockAction | None, ins, args, kwargs):
        """The block's first call, eager: run it, check the pattern on its real outputs, store if ``action`` says
        so. ``action=None`` (compiled path): check only, and leave the inputs as they were for the real run."""
        st, ref = self._state, self._ref
        saved = [x.clone() if x is not None else None for x in ins]
        out = self.block(*args, **kwargs)
        outs = self._outputs(out, ins)
        self._check(saved, ins, outs)
        st.none_out[ref.index] = tuple(o is None for o in outs)
        if action is None:
            if ref.index in st.clone_inputs:
                for x, v in zip(ins, saved):
                    if x is not None:
                        x.copy_(v)
        elif action.store:
            store_residuals(st.caches, ref.index, action.slot, outs, saved)
        return out

    def _outputs(self, out, ins) -> list:
        ref, cls = self._ref, type(self.block).__name__
        names = ref.pattern.returns
        if ref.pattern.single_output:
            if not isinstance(out, torch.Tensor):
                raise BlockPatternError(f"{cls} returned {type(out).__name__}; the pattern says it returns "
                                        f"{names[0]} alone")
            return [out]
        if not isinstance(out, (tuple, list)) or len(out) != len(names):
            got = f"{type(out).__name__} of {len(out)}" if isinstance(out, (tuple, list)) else type(out).__name__
            raise BlockPatternError(f"{cls} returned a {got}; the pattern says it returns ({', '.join(names)})")
        return list(out)

    def _check(self, saved, ins, outs) -> None:
        """First call of this block: stream types, shapes and order; inputs left unmodified."""
        st, ref = self._state, self._ref
        self._check_streams(saved, outs)
        for x, y in zip(saved, ins):
            if x is not None and not torch.equal(x, y):
                st.clone_inputs.add(ref.index)  # the block writes its inputs in place: keep a copy when storing
        st.checked.add(ref.index)

    def _check_streams(self, ins, outs) -> None:
        """Each returned stream a tensor of its input's shape (``None`` outputs pass), in the pattern's order."""
        cls, names = type(self.block).__name__, self._ref.pattern.returns
        for k, (n, x, o) in enumerate(zip(names, ins, outs)):
            if o is None:
                continue
            if not isinstance(o, torch.Tensor):
                raise BlockPatternError(f"{cls} output {k} ({n}) is a {type(o).__name__}, not a tensor")
            if x is None:
                raise BlockPatternError(f"{cls} returns {n} but was called without it: no input to take a "
                                        f"residual from")
            if o.shape != x.shape:
                other = [m for m, y in zip(names, ins) if y is not None and m != n and y.shape == o.shape]
                hint = (f"; it has the shape of {other[0]}: the block returns its streams in another order than "
                        f"the pattern's ({', '.join(names)})") if other else ""
                raise BlockPatternError(f"{cls} output {k} should be {n} of shape {list(x.shape)} but has shape "
                                        f"{list(o.shape)}{hint}")


def _layout(ins) -> tuple:
    """The stream inputs' shapes and strides (``torch.compile(dynamic=False)`` specialises on both: e.g. Flux's
    single blocks after the first get their streams as views of one joint tensor)."""
    return tuple(None if x is None else (tuple(x.shape), x.stride()) for x in ins)


class BlockCachedTransformer(BlockSteps, BlockGraphs, DropInModule):
    """A diffusers transformer that follows a block-level static schedule (``branches == ["block"]``).

    Same forward signature and output type as the wrapped model, which is neither modified nor copied
    (weights shared). The step is found from the timestep argument (mapped to the sampler's timestep
    for families whose pipelines pass ``t / 1000`` and the like); a new generation starts when the
    schedule's first timestep comes again. Several calls per step (a pipeline that runs the conditional and
    unconditional passes separately inside ``transformer.cache_context(...)``, e.g. Wan) are passes of one
    step, each with its own caches. On a GPU the timestep is not read (no host sync); see
    :mod:`~l2c_kernels.runtime.block_steps` for how steps and passes are found there. ``set_step`` /
    ``reset`` control the step explicitly.

    ``cuda_graphs`` and ``capture()``: as for the branch-level module (one graph per distinct step plan and
    pass, captured at step 0 ahead of the steps that replay it; see :class:`BlockGraphs`).
    ``torch_compile=True`` (or a dict of ``torch.compile`` options) compiles one block's work per kind
    (:mod:`l2c_kernels.runtime.block_work`), shared by every block of a structure and every step.
    """

    def __init__(self, model: nn.Module, schedule: Schedule, *, passes_per_step: int = 1,
                 cuda_graphs: bool | str = "auto", torch_compile: bool | dict = False, timestep_check: str = "host",
                 max_signatures: int = 4):
        super().__init__()
        fam = pattern_for(model)
        self._check_schedule(fam, schedule)
        schedule.validate_for(model)
        refs = find_blocks(model, fam)
        self.original_model = model  # registered: .to()/.half() reach the shared weights
        self.schedule, self.pattern = schedule, fam
        self._init_steps(passes_per_step, timestep_check)
        self._actions = self._make_actions(schedule)
        ids: dict = {}
        self._plan_of = [ids.setdefault(a, len(ids)) for a in self._actions]  # step -> plan id (graph key)
        self._init_graphs(schedule, cuda_graphs, max_signatures)
        self._state = _RunState(fam, refs)
        object.__setattr__(self, "_shadow", self._make_shadow(model, fam, refs, self._state))
        self._model_sig = inspect.signature(type(model).forward)
        self._caches: dict[tuple, BlockCaches] = {}  # (pass, input signature or None) -> caches
        self._step_flops = step_flops(schedule)
        self.step_counts = [0] * schedule.num_steps   # first passes run, per step
        self.calls = 0
        self.generations = 0
        if torch_compile:
            self._compile(torch_compile)

    # ------------------------------------------------------------ what a subclass (branch level) changes
    @staticmethod
    def _check_schedule(fam: FamilyPattern, schedule: Schedule) -> None:
        if schedule.attn2_cache == "cfg_mean" or "attn2" in schedule.branches:
            why = ("it uses joint attention over text and image tokens: there is no cross-attention to cache"
                   if fam.joint_attention else "its cross-attention is not cached separately at block level")
            raise ScheduleError(f"T-GATE (and branch-level attn2) schedules cannot run on {fam.model_class}: {why}. "
                                f"Use a block-level schedule (branches ['block']).")
        if not schedule.is_block_level:
            raise ScheduleError(f"{fam.model_class} runs block-level schedules (branches ['block']); this schedule "
                                f"has branches {schedule.branches}")

    @staticmethod
    def _make_actions(schedule: Schedule) -> list:
        return block_actions(schedule)

    @staticmethod
    def _step_plans(schedule: Schedule) -> list:
        return block_plans(schedule) if schedule.is_block_level else compile_plans(schedule)

    def _wrapper(self, ref: BlockRef, state: _RunState) -> nn.Module:
        return _BlockWrapper(ref, state)

    def _make_shadow(self, model, fam, refs, state) -> nn.Module:
        return shadow_with(model, fam, refs, lambda r: self._wrapper(r, state))

    def _compile(self, options: bool | dict) -> None:
        st = self._state
        st.compiled = True
        st.work = compiled_work(block_work, options)
        st.unit_work = compiled_work(unit_work, options)  # (branch level: one two-stream block's units)
        cfg = torch._dynamo.config  # one graph per (block structure, kind): raise the recompile limit to fit
        structures = len({type(r.module) for r in st.refs}) + 2
        kinds = len({a for row in self._actions for a in row})
        cfg.cache_size_limit = max(cfg.cache_size_limit, 2 * structures * kinds + 8)

    # ------------------------------------------------------------ step control: BlockSteps; pipeline-facing attributes: DropInModule
    def reset(self) -> None:
        """Forget the current generation: the next call must be step 0 (which fills the caches)."""
        self._step, self._pass, self._forced_step = None, 0, None
        for c in self._caches.values():
            c.clear()

    def _plan_ids(self) -> list:
        return self._plan_of

    def _compiled_kinds(self) -> set | None:
        """(block structure, kind, layout, empty buffers) run on the ``torch.compile`` path."""
        return self._state.kinds_run if self._state.compiled else None

    def _summary_extra(self) -> dict:
        return {"calls": self.calls, "passes_per_step": 1 + max((k[0] for k in self._caches), default=0)}

    # ------------------------------------------------------------ forward
    def forward(self, *args, **kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)
        if x is not None:
            self._check_latents(x)   # before the step is counted: a refused call leaves the module as it was
        step, p = self._resolve(args, kwargs)
        if self._graphs.mode is not False and self._graphs.applies(self._weight()):
            return self._graph_forward(step, p, args, kwargs)
        caches = self._caches_for(p, None)
        if step == 0:
            caches.clear()
        out = self._run_step(step, caches, args, kwargs)
        self._end(step, p, caches)
        return out

    def _run_step(self, step: int, caches: BlockCaches, args: tuple, kwargs: dict):
        """The family's forward on the shadow, every block following step ``step``'s plan on ``caches``."""
        st = self._state
        st.actions, st.caches, st.step, st.next_block = self._actions[step], caches, step, 0
        with torch.no_grad():
            out = self._shadow(*args, **kwargs)
        if st.next_block != len(st.refs):
            missed = st.refs[st.next_block]
            raise BlockPatternError(f"{self.pattern.model_class}'s forward did not run {missed.list_name}"
                                    f"[{missed.list_index}] (ran {st.next_block} of {len(st.refs)} blocks); the "
                                    f"pattern table says every block of {list(self.pattern.block_lists)} runs")
        return out

    def _caches_for(self, p: int, sig) -> BlockCaches:
        """The caches of pass ``p`` (and, with CUDA graphs, input signature ``sig``: the graphs captured for a
        signature keep its buffers; at most ``max_signatures`` signatures, the oldest dropped with the graphs)."""
        caches = self._caches.get((p, sig))
        if caches is None:
            sigs = list(dict.fromkeys(k[1] for k in self._caches if k[1] is not None))
            if sig is not None and len(sigs) >= self.max_signatures:
                for k in [k for k in self._caches if k[1] == sigs[0]]:
                    del self._caches[k]
                self._graphs.release()
            caches = self._caches[(p, sig)] = BlockCaches()
        return caches

    def _end(self, step: int, p: int, caches: BlockCaches) -> None:
        self._step, self._pass = step, p
        caches.ran.add(step)
        self.calls += 1
        if p == 0:
            self.step_counts[step] += 1
        if step == self.schedule.num_steps - 1:
            caches.generations += 1
            self.generations += p == 0
