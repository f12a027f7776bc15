"""CUDA graphs for the block-level modules (:class:`~l2c_kernels.runtime.block_runtime.BlockCachedTransformer`
and its branch-level subclass for SD3 / Flux).

The bookkeeping is the branch-level runtime's (:class:`~l2c_kernels.runtime.cuda_graphs.GraphCache`: one
memory pool, static input buffers per signature, inputs copied only when they changed, capture failures
raised, the same ``cuda_graphs`` modes and ``"emulate"`` backend). What is captured here is one whole call of
the family's forward on the shadow, per distinct step plan and per pass (its caches), with every block
following the plan. Graphs are captured ahead, at step 0: every plan at once, in the order the schedule
first uses them, after one eager run of each (it allocates every cache buffer outside the graphs and runs
the pattern checks, which read tensors, before any capture). The caches of a pass are kept per input
signature, so a captured graph's buffers are never reallocated.

A replay runs nothing on the host per block, so the checks the eager wrappers make per call (block order,
caches filled) are made once per step instead: a step may run only after the steps whose caches it reads
(:func:`~l2c_kernels.runtime.plan.step_table`), in this generation.
"""
from __future__ import annotations

import inspect

import torch

from ..schedule import ScheduleError
from .cuda_graphs import CudaGraphError, GraphCache, signature
from .plan import step_table


class BlockGraphs:
    """CUDA graphs (real or emulated) for a block-level module; mixed into the module class."""

    def _init_graphs(self, schedule, cuda_graphs: bool | str, max_signatures: int) -> None:
        self._graphs = GraphCache.for_mode(cuda_graphs)
        self.cuda_graphs, self.max_signatures = cuda_graphs, max_signatures
        plans = self._step_plans(schedule)
        self._needs = [e.needs for e in step_table(schedule, plans, [False] * schedule.num_steps)]
        self._out_format: dict = {}

    def capture(self, *args, **kwargs) -> int:
        """Capture the graph of every step plan, for every pass, for inputs shaped like these (a call's
        arguments), before the first image; returns the number of graphs. Raises
        :class:`~l2c_kernels.runtime.cuda_graphs.CudaGraphError` if a capture fails. The caches hold no data
        afterwards: the next call is step 0."""
        self._graphs.require(self._weight())
        a = self._call_args(args, kwargs)
        self.reset()
        sig = signature(a)
        for p in range(self.passes_per_step):
            self._capture_all(a, self._caches_for(p, sig), only_new=False)
        self.reset()
        return self.num_graphs()

    # ------------------------------------------------------------------------------------------ per call
    def _graph_forward(self, step: int, p: int, args: tuple, kwargs: dict):
        a = self._call_args(args, kwargs)
        caches = self._caches_for(p, signature(a))
        if step == 0:
            caches.clear()
            if self._graphs.capture_due(caches.generations):
                self._capture_all(a, caches, only_new=True)
        else:
            missing = sorted(self._needs[step] - caches.ran)
            if missing:
                raise ScheduleError(f"step {step} reuses caches that were not filled in this generation (steps "
                                    f"{missing} did not run); start at step 0, or call reset()")
        t = self._graphs.replay((self._plan_of[step], id(caches)), a)
        out = self._run_step(step, caches, (), a) if t is None else self._wrap(t, a)
        self._end(step, p, caches)
        return out

    def _call_args(self, args: tuple, kwargs: dict) -> dict:
        """The call's arguments by name (the form the graphs' static inputs are kept in)."""
        try:
            bound = self._model_sig.bind(self.original_model, *args, **kwargs).arguments
        except TypeError as e:
            raise TypeError(f"{self.pattern.model_class}.forward: {e}") from None
        params = list(self._model_sig.parameters.values())
        a = dict(bound)
        a.pop(params[0].name, None)
        for prm in params[1:]:
            if prm.name not in a:
                continue
            if prm.kind is inspect.Parameter.VAR_KEYWORD:
                a.update(a.pop(prm.name))
            elif prm.kind is inspect.Parameter.VAR_POSITIONAL:
                if a.pop(prm.name):
                    raise CudaGraphError(f"{self.pattern.model_class}.forward was called with extra positional "
                                         f"arguments; pass them by name to run it in CUDA graphs")
        return a

    # ------------------------------------------------------------------------------------------ capture
    def _capture_all(self, a: dict, caches, only_new: bool) -> None:
        if only_new and self._graphs.captured((self._plan_of[0], id(caches)), a):
            return
        firsts = list(dict.fromkeys(self._plan_of))  # plan ids in the order the schedule first uses them
        todo = [self._plan_of.index(k) for k in firsts]
        for s in todo:  # eager: allocate every buffer and run the pattern checks before any capture
            self._graph_fn(s, caches)(a)
        state = list(caches.buffers.values())
        self._graphs.capture_plans([((self._plan_of[s], id(caches)), a, self._graph_fn(s, caches)) for s in todo],
                                   state)

    def _graph_fn(self, step: int, caches):
        def run(a: dict) -> torch.Tensor:
            return self._tensor_out(self._run_step(step, caches, (), a), a)
        return run

    def _tensor_out(self, out, a: dict) -> torch.Tensor:
        """The one tensor a call returns (remembering its container for :meth:`_wrap`)."""
        if isinstance(out, torch.Tensor):
            fmt, t = None, out
        elif isinstance(out, tuple):
            fmt, t = tuple, out[0] if len(out) == 1 else None
        else:  # diffusers' output dataclasses
            keys = list(out.keys())
            fmt, t = (type(out), keys[0]), out[keys[0]] if len(keys) == 1 else None
        if not isinstance(t, torch.Tensor):
            raise CudaGraphError(f"{self.pattern.model_class}.forward returned {type(out).__name__} with other than "
                                 f"one tensor; CUDA graphs take a forward that returns one tensor")
        self._out_format[repr(a.get("return_dict"))] = fmt
        return t

    def _wrap(self, t: torch.Tensor, a: dict):
        """A replayed output in the container the family's forward returns."""
        fmt = self._out_format[repr(a.get("return_dict"))]
        if fmt is None:
            return t
        if fmt is tuple:
            return (t,)
        cls, key = fmt
        return cls(**{key: t})
