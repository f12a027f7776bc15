"""The drop-in module returned by :func:`compile_schedule`.

Per call the host does one table lookup: the step (from a call counter, see below), then the step's
:class:`~l2c_kernels.runtime.plan.StepEntry` (its plan, whether CFG collapse may apply, which earlier
steps it depends on) and, per cache set, every block's buffers (:meth:`CacheSet.calls`). Nothing is
read from the device on that path unless the tensors are on the host anyway or ``timestep_check="strict"``.

Which step a call is. The step comes from a call counter: step 0, then 1, 2, ... in call order; after
the schedule's last step the next call is step 0 again. A new generation is detected (1) when the
counter wraps, (2) when the timestep -- read only where that costs no device sync: a Python number or
a CPU tensor (``timestep_check="host"``, the default), or always (``"strict"``) -- is the schedule's
first timestep, (3) by ``reset()`` / ``set_step(0)``, and (4) with ``l2c.enable(pipe, ...)``, at every
``pipe.scheduler.set_timesteps`` call, i.e. at the start of every pipeline call. A timestep read on the
host that is not the expected one moves to its step (or raises, naming both step lists); on a GPU in
the default mode a sampler that skips or repeats calls without (3) or (4) is not noticed.
"""
from __future__ import annotations

import inspect
import types

import torch
from torch import nn

from ..adapters import adapter_for, level_for
from ..adapters.base import BlockAdapter, StepInputs
from ..schedule import BRANCH_LEVEL, TWO_STREAM_LEVEL, Schedule, ScheduleError, same_timestep
from .block_flops import step_flops
from .drop_in import DropInModule, check_timestep_mode
from .caches import CacheSet
from .cuda_graphs import GraphCache
from .plan import StepEntry, StepPlan, collapsible_steps, compile_plans, step_table
from .step_work import run_block, run_reuse_step
from .warm_steps import WarmSteps, same_structure, signature

_PER_SAMPLE_TEXT = ("encoder_hidden_states", "encoder_attention_mask")


class CachedTransformer(DropInModule):
    """A diffusers transformer that follows a static cache schedule.

    Same forward signature and output type as the wrapped model; the model itself is not modified and
    its weights are shared. See the module docstring for how calls map to steps; ``set_step`` /
    ``reset`` control it explicitly.
    """

    def __init__(self, model: nn.Module, schedule: Schedule, *, cuda_graphs: bool | str = "auto",
                 torch_compile: bool | dict = False, cfg_collapse: bool | str = True,
                 timestep_check: str = "host", max_signatures: int = 4):
        super().__init__()
        graphs = GraphCache.for_mode(cuda_graphs)  # (raises on a bad mode)
        if cfg_collapse not in (True, False, "assume"):
            raise ValueError(f"cfg_collapse must be True, False or 'assume', got {cfg_collapse!r}")
        check_timestep_mode(timestep_check)
        self.adapter = adapter_for(model)
        schedule.validate_for(model)
        self.original_model = model  # registered: .to()/.half() reach the shared weights
        self.schedule = schedule
        self.plans: list[StepPlan] = compile_plans(schedule)
        self.collapsible = collapsible_steps(schedule) if cfg_collapse else [False] * schedule.num_steps
        self.steps: tuple[StepEntry, ...] = step_table(schedule, self.plans, self.collapsible)
        self.cfg_collapse, self.timestep_check, self.cuda_graphs = cfg_collapse, timestep_check, cuda_graphs
        self.max_signatures = max_signatures
        self._blocks = list(self.adapter.blocks(model))
        self._cfg_mean = schedule.attn2_cache == "cfg_mean" and "attn2" in schedule.branches
        self._graphs = graphs
        self._caches: dict[tuple, CacheSet] = {}
        self._bind_info = self._forward_parameters(model)
        self._step_flops = step_flops(schedule)
        self._compiled = bool(torch_compile)
        self._compile_opts = None
        if torch_compile:
            self._compile_opts = dict(fullgraph=True, dynamic=False)
            if isinstance(torch_compile, dict):
                self._compile_opts.update(torch_compile)
        self._fns: dict = {}   # ("block" | "step", kind) -> its compiled function (_compiled_fn)
        self._kinds_run: set = set()
        # Where every block has the same structure: (1) a (step, collapsed, input signature) that ran compiled skips
        # its guards after (each kind has a compiled function of its own, whose entries differ only in input shapes;
        # see warm_steps.py); (2) steps whose blocks all do one kind of reuse run as one graph
        # (step_work.run_reuse_step), the same graph for every such step of that kind
        self._warm = WarmSteps()
        self._skip_guards = bool(torch_compile) and same_structure(self._blocks)
        self.collapsed_calls = 0
        self.step_counts = [0] * schedule.num_steps
        self.generations = 0
        self.reset()

    # ------------------------------------------------------------ step control (set_step, pipeline-facing attributes: DropInModule)
    def reset(self) -> None:
        """Forget the current generation: the next call is step 0 (which fills the caches)."""
        self._step, self._forced_step, self._gen_key = None, None, None
        self._ran: set = set()
        self._diverged = False       # halves differed at a collapsible step of this generation
        self._half_pending: set = set()  # caches whose second half a collapsed step wrote

    def _plan_ids(self) -> list:
        return [p.key for p in self.plans]

    def _compiled_kinds(self) -> set | None:
        """(``"block"`` | ``"step"``, kind, shape): a block of each kind and a whole step of each reuse kind (see
        ``step_work``)."""
        return self._kinds_run if self._compiled else None

    def _summary_extra(self) -> dict:
        return dict(collapsed_calls=self.collapsed_calls, timestep_check=self.timestep_check)

    # ------------------------------------------------------------ binding (once per call, no inspect)
    def _forward_parameters(self, model):
        if type(self.adapter).bind is not BlockAdapter.bind:
            return None
        params = list(inspect.signature(type(model).forward).parameters.values())[1:]
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            return None
        names = tuple(p.name for p in params)
        defaults = {p.name: (None if p.default is p.empty else p.default) for p in params}
        return names, frozenset(names), defaults

    def _bind(self, args: tuple, kwargs: dict) -> tuple[dict, bool]:
        info = self._bind_info
        if info is not None and len(args) <= len(info[0]):
            names, known, defaults = info
            if args:
                pos = dict(zip(names, args))
                if not pos.keys() & kwargs.keys():
                    kwargs = {**pos, **kwargs}
                else:
                    info = None
            if info is not None and kwargs.keys() <= known:
                a = dict(defaults)
                a.update(kwargs)
                rd = a.pop("return_dict", True)
                return a, True if rd is None else bool(rd)
        inputs = self.adapter.bind(self.original_model, args, kwargs)  # raises the usual TypeError
        return inputs.args, inputs.return_dict

    # ------------------------------------------------------------ which step
    def _resolve_step(self, timestep, check: bool = True) -> int:
        nsteps = self.schedule.num_steps
        nxt = 0 if self._step is None or self._step + 1 >= nsteps else self._step + 1
        if self._forced_step is not None:
            s, self._forced_step = self._forced_step, None
        else:
            t = self._host_timestep(timestep)
            if t is None:
                if timestep is None and self.timestep_check != "off":
                    raise ValueError("the transformer was called without a timestep; pass one or call set_step()")
                s = nxt
            elif same_timestep(self.schedule.timesteps[nxt], t):
                s = nxt
            elif same_timestep(self.schedule.timesteps[0], t):
                s = 0
            else:
                s = self.schedule.step_index(t, after=self._step)  # raises with both step lists if unknown
        if s == 0:
            self._ran.clear()
            self._diverged = False
            self._half_pending.clear()
        elif s != nxt and check:
            missing = sorted(self.steps[s].needs - self._ran)
            if missing:
                raise ScheduleError(f"step {s} reuses caches that were not filled in this generation (steps {missing} "
                                    f"did not run); start at step 0, or call reset()")
        return s

    def _caches_for(self, x: torch.Tensor, step: int) -> CacheSet:
        key = (x.shape, x.dtype, x.device)
        if step == 0 or self._gen_key is None:
            self._gen_key = key
        elif key != self._gen_key:
            raise ValueError(f"input shapes changed in the middle of a generation (step {step}); caches hold data for "
                             f"the previous shapes. Start a new generation at step 0 or call reset().")
        caches = self._caches.get(key)
        if caches is None:
            if self._cfg_mean and x.shape[0] % 2:
                raise ValueError(f"this schedule caches cross-attention as the mean of the two classifier-free "
                                 f"guidance halves, which needs an even batch; got batch {x.shape[0]}")
            while len(self._caches) >= self.max_signatures:  # drop the oldest shapes and their graphs
                del self._caches[next(iter(self._caches))]
                self._graphs.release()
            caches = self._caches[key] = CacheSet(self._hidden_like(x))
        return caches

    def _hidden_like(self, x: torch.Tensor) -> torch.Tensor:
        """A tensor with the residual stream's shape ``[B, N, C]`` for input ``x``."""
        cfg = self.original_model.config
        p = cfg.patch_size
        n = (x.shape[-2] // p) * (x.shape[-1] // p)
        c = cfg.num_attention_heads * cfg.attention_head_dim
        return torch.empty((x.shape[0], n, c), dtype=self.dtype, device=x.device)

    # ------------------------------------------------------------ forward
    def forward(self, *args, **kwargs):
        a, return_dict = self._bind(args, kwargs)
        x = a["hidden_states"]
        self._check_latents(x)
        entry = self.steps[self._resolve_step(a.get("timestep"))]
        caches = self._caches_for(x, entry.index)
        collapse = self._collapse(entry, a)
        run_args = _half_args(a) if collapse else a
        with torch.no_grad():
            if self._half_pending and not collapse:
                self._sync_halves(caches)
            if self._use_graphs(x):
                if entry.index == 0 and self._graphs.capture_due(caches.generations):
                    self._capture_all(a, caches, only_new=True)
                out = self._graphs.run(self._graph_key(entry, caches, collapse), run_args,
                                       lambda r: self._run_plan(entry, r, caches, collapse))
            else:
                out = self._run_plan(entry, run_args, caches, collapse)
            if collapse:
                out = torch.cat([out, out])
                self.collapsed_calls += 1
                self._half_pending.update(entry.half_writes)
        self._end(entry.index, caches)
        if not return_dict:
            return (out,)
        return _output(out)

    def _end(self, step: int, caches: CacheSet) -> None:
        self._step = step
        self._ran.add(step)
        self.step_counts[step] += 1
        if step == self.schedule.num_steps - 1:
            caches.generations += 1
            self.generations += 1

    def _run_plan(self, entry: StepEntry, args: dict, caches: CacheSet, collapsed: bool = False) -> torch.Tensor:
        """One transformer call following ``entry``'s plan (eager, captured, or with compiled blocks).

        ``collapsed``: the call carries one CFG half; per-sample caches are used through their second half.
        """
        ad, model = self.adapter, self.original_model
        inputs = StepInputs(args=args)
        h, ctx = ad.prepare(model, inputs)
        calls = caches.calls(entry.index, entry.plan, collapsed, self._compiled)
        h = h.contiguous()
        if not self._compiled:
            for block, c in zip(self._blocks, calls):
                h = run_block(ad, block, h, ctx, c.kind, c.bufs, c.weights, c.wtensors, c.delta)
            return ad.finish(model, h, ctx, inputs)
        ctxs = tuple(ad.traced_context(block, ctx) for block in self._blocks)  # host caches resolved per block
        key = (entry.index, collapsed, signature(args)) if self._skip_guards else None
        with self._warm.run(key):
            if self._skip_guards and _one_reuse_kind(calls):   # one structure: see __init__
                kind = calls[0].kind
                self._kinds_run.add(("step", kind, h.shape))
                h = self._compiled_fn("step", kind)(
                    ad, tuple(self._blocks), h, ctxs, kind, tuple(c.bufs for c in calls),
                    tuple(c.weights for c in calls), tuple(c.wtensors for c in calls), tuple(c.delta for c in calls))
            else:
                self._kinds_run.update(("block", c.kind, h.shape) for c in calls)
                for block, bctx, c in zip(self._blocks, ctxs, calls):
                    h = self._compiled_fn("block", c.kind)(ad, block, h, bctx, c.kind, c.bufs, c.weights, c.wtensors,
                                                           c.delta)
        return ad.finish(model, h, ctx, inputs)

    def _compiled_fn(self, unit: str, kind: tuple):
        """The compiled function of one kind of work (``"block"``: ``run_block``, ``"step"``: ``run_reuse_step``),
        made at its first use with a code object of its own: dynamo caches graphs per code object, so every kind's
        graph is the only entry of its function (one more per new input shape) and is never told apart from
        another kind's by guards -- which skipping guards on warm steps would not evaluate."""
        fn = self._fns.get((unit, kind))
        if fn is None:
            fn = self._fns[(unit, kind)] = torch.compile(_own_code(run_block if unit == "block" else run_reuse_step),
                                                         **_compile_options(self._compile_opts, self.device))
        return fn

    # ------------------------------------------------------------ CFG collapse
    def _collapse(self, entry: StepEntry, args: dict) -> bool:
        """Run this call on one CFG half? Static: the schedule makes both halves compute the same thing at
        this step. Run time: the halves carry the same latents, timestep and other per-sample inputs --
        compared exactly where that costs no device sync (host tensors, or ``timestep_check="strict"``),
        taken as given with ``cfg_collapse="assume"``, and otherwise not collapsed."""
        if not entry.collapsible or self._diverged:
            return False
        x = args["hidden_states"]
        if x.shape[0] % 2:
            return False
        if self.cfg_collapse == "assume":
            return True
        if self.timestep_check == "off" or (self.timestep_check == "host" and x.device.type != "cpu"):
            return False
        b = x.shape[0]
        for k, v in args.items():
            if k in _PER_SAMPLE_TEXT:
                continue
            for t in (v.values() if isinstance(v, dict) else [v]):
                if isinstance(t, torch.Tensor) and t.ndim >= 1 and t.shape[0] == b and not torch.equal(t[:b // 2],
                                                                                                   t[b // 2:]):
                    self._diverged = True
                    return False
        return True

    def _collapse_possible(self, x: torch.Tensor) -> bool:
        if self.cfg_collapse is False or x.shape[0] % 2:
            return False
        return self.cfg_collapse == "assume" or self.timestep_check == "strict" or (
            self.timestep_check == "host" and x.device.type == "cpu")

    def _sync_halves(self, caches: CacheSet) -> None:
        """Before a full-batch step, copy what collapsed steps wrote (second half) to the first half."""
        for key in self._half_pending:
            buf = caches.buffer_for(key)
            h = buf.shape[0] // 2
            buf[:h].copy_(buf[h:])
        self._half_pending.clear()

    # ------------------------------------------------------------ CUDA graphs
    @staticmethod
    def _graph_key(entry: StepEntry, caches: CacheSet, collapse: bool) -> tuple:
        return (entry.plan.key, id(caches), collapse)

    def _use_graphs(self, x: torch.Tensor) -> bool:
        return self._graphs.applies(x)

    def capture(self, *args, **kwargs) -> int:
        """Capture the CUDA graph of every step plan for inputs shaped like these (a call's arguments), before
        the first image; returns the number of graphs. Raises :class:`CudaGraphError` if a capture fails.
        The caches hold no data afterwards: the next call is step 0."""
        a, _ = self._bind(args, kwargs)
        x = a["hidden_states"]
        self._graphs.require(x)
        self.reset()
        caches = self._caches_for(x, 0)
        self._capture_all(a, caches, only_new=False)
        self.reset()
        return self.num_graphs()

    def _capture_all(self, args: dict, caches: CacheSet, only_new: bool) -> None:
        if not isinstance(self._graphs, GraphCache) or (
                only_new and self._graphs.captured(self._graph_key(self.steps[0], caches, False), args)):
            return
        x = args["hidden_states"]
        todo, seen = [], set()
        for e in self.steps:
            for coll in ((False, True) if e.collapsible and self._collapse_possible(x) else (False,)):
                if (e.plan.key, coll) not in seen:
                    seen.add((e.plan.key, coll))
                    todo.append((e, coll))
                    caches.calls(e.index, e.plan, coll, self._compiled)  # allocate every buffer before capture
        state = caches.all_buffers()
        half = _half_args(args)
        with torch.no_grad():
            self._graphs.capture_plans([(self._graph_key(e, caches, coll), half if coll else args,
                                         lambda a, e=e, coll=coll: self._run_plan(e, a, caches, coll)) for e, coll in todo],
                                       state)

    # ------------------------------------------------------------ pieces for pipeline/data parallel wrappers
    def begin_step(self, args: dict, step: int | None = None) -> tuple[int, CacheSet]:
        """Resolve the step (from the timestep, or ``step``) and the caches for a call with ``args``, as
        ``forward`` does; for wrappers that run the blocks in pieces (e.g. on several devices)."""
        if step is not None:
            self.set_step(step)
        s = self._resolve_step(args.get("timestep"), check=False)
        return s, self._caches_for(args["hidden_states"], s)

    def run_blocks(self, step: int, h: torch.Tensor, ctx, caches: CacheSet, start: int, end: int) -> torch.Tensor:
        """Run blocks ``start..end-1`` of step ``step``'s plan on ``h`` (in place), eagerly, with the fused ops."""
        calls = caches.calls(step, self.plans[step], False, False)
        h = h.contiguous()
        with torch.no_grad():
            for b in range(start, end):
                c = calls[b]
                h = run_block(self.adapter, self._blocks[b], h, ctx, c.kind, c.bufs, c.weights, c.wtensors, c.delta)
        return h

    def end_step(self, step: int) -> None:
        self._step = step
        self._ran.add(step)
        self.step_counts[step] += 1


def _compile_options(opts: dict, device: torch.device) -> dict:
    """``torch.compile`` options for one kind's function. On CPU with inductor and no options or mode of the caller's:
    inductor's C++ wrapper (``cpp_wrapper``), which calls the kernels of a graph from C++ rather than Python: a step
    makes one call per block, and on dit-digits the Python wrapper's per-call work was 3-4% of a generation (its
    graphs take longer to build: ``bench/NOTES.md``)."""
    if (device.type == "cpu" and opts.get("backend", "inductor") == "inductor" and "options" not in opts
            and "mode" not in opts):
        return dict(opts, options={"cpp_wrapper": True})
    return opts


def _own_code(fn):
    """``fn`` with a code object of its own: a module's compiled kinds (dynamo caches them per code object) are
    neither shared with nor evicted by another module's."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)


def _one_reuse_kind(calls) -> bool:
    """Every block of the step does the same work and none computes a branch (``run_reuse_step``'s steps)."""
    k = calls[0].kind
    return not k[2] and all(c.kind == k for c in calls)


def _half_args(args: dict) -> dict:
    """The second (conditional) half of every per-sample tensor argument."""
    b = args["hidden_states"].shape[0]

    def half(v):
        if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == b:
            return v[b // 2:]
        if isinstance(v, dict):
            return {k: half(t) for k, t in v.items()}
        return v

    return {k: half(v) for k, v in args.items()}


_OUTPUT = []


def _output(sample: torch.Tensor):
    if not _OUTPUT:
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        _OUTPUT.append(Transformer2DModelOutput)
    return _OUTPUT[0](sample=sample)


def compile_schedule(model: nn.Module, schedule: Schedule, *, cuda_graphs: bool | str = "auto",
                     torch_compile: bool | dict = False, cfg_collapse: bool | str = True,
                     timestep_check: str = "host") -> CachedTransformer:
    """Turn ``model`` (a supported diffusers transformer) and a static ``schedule`` into a drop-in module.

    ``pipe.transformer = compile_schedule(pipe.transformer, schedule)`` makes the pipeline skip the
    scheduled work (``l2c.enable(pipe, schedule)`` does the same and more, see ``runtime.enable``).

    - ``cuda_graphs``: on CUDA, every distinct step plan is captured in a CUDA graph ahead of the steps
      that replay it: ``"auto"`` (default) at the start of the second generation for an input shape (a
      module used for a single generation, e.g. to measure a candidate schedule, never captures), ``True``
      at the first call, or explicitly with ``module.capture(**example_inputs)`` before the first image.
      ``False``: never. ``"emulate"``: the same bookkeeping replayed on the CPU (tests). A capture
      failure raises :class:`~l2c_kernels.runtime.cuda_graphs.CudaGraphError`.
    - ``torch_compile=True`` (or a dict of ``torch.compile`` options) compiles one block's work per kind
      of block plan (``fullgraph=True``): the number of graphs does not grow with the number of distinct
      step plans.
    - ``cfg_collapse``: with a T-GATE-style schedule (CFG-mean cross-attention cache), steps at which both
      guidance halves must compute the same output run on one half when the halves' inputs are equal:
      compared where that costs no device sync (CPU tensors, or ``timestep_check="strict"``); on a GPU,
      ``"assume"`` takes it as given (pipelines that batch CFG as ``torch.cat([latents] * 2)``).
      ``False`` turns it off.
    - ``timestep_check``: ``"host"`` reads the timestep only from Python numbers and CPU tensors (no device
      sync), ``"strict"`` always (a sync per step on a GPU: for debugging), ``"off"`` never (the call
      counter alone decides the step).
    """
    model = getattr(model, "original_model", model)
    if level_for(model, schedule.branches) != BRANCH_LEVEL:
        # the pattern-table runtime: whole blocks (Flux, SD3, Wan, ..., or a ["block"] schedule), SD3 / Flux units
        return compile_blocks(model, schedule, cuda_graphs=cuda_graphs, torch_compile=torch_compile,
                              timestep_check=timestep_check)
    return CachedTransformer(model, schedule, cuda_graphs=cuda_graphs, torch_compile=torch_compile,
                             cfg_collapse=cfg_collapse, timestep_check=timestep_check)


def compile_blocks(model: nn.Module, schedule: Schedule, **kwargs):
    """The pattern-table runtime for ``model`` (or a compiled module's original) and ``schedule``:
    :class:`~l2c_kernels.runtime.block_runtime.BlockCachedTransformer`, or for SD3 / Flux at branch level
    :class:`~l2c_kernels.runtime.branch_wrappers.BranchCachedTransformer`."""
    from .block_runtime import BlockCachedTransformer
    from .branch_wrappers import BranchCachedTransformer

    model = getattr(model, "original_model", model)
    if level_for(model, schedule.branches) == TWO_STREAM_LEVEL:  # SD3 / Flux at branch level
        return BranchCachedTransformer(model, schedule, **kwargs)
    return BlockCachedTransformer(model, schedule, **kwargs)
