"""CUDA graphs for static step plans, captured ahead of the steps that replay them.

One graph per (step plan, CFG collapse, input signature); all graphs of a module share one memory
pool and one set of static input buffers per signature. Caches live outside the graphs, so a graph
reads what another step's graph wrote. A replay copies into the static buffers only the inputs that
changed: an input that is the same tensor object as the one copied last time, with the same version
counter (nothing wrote to it in place), is not copied again -- the text embeddings and class labels a
pipeline passes unchanged at every step. That rule is host-only (no device sync).

Capture is explicit (:meth:`GraphCache.capture`, called by ``CachedTransformer.capture`` or at the
start of a signature's second generation); a capture failure raises :class:`CudaGraphError` instead
of falling back to eager in silence.

``EmulatedBackend`` replays on the CPU with the same bookkeeping and the same freezing: capture runs the function
once under a dispatch recorder -- every operator with its arguments, host numbers included, and the tensor it wrote
-- and then leaves every cache as it was (a real capture executes nothing); a replay re-executes the recorded
operators on the same buffers and never runs the Python function again. So an input the bookkeeping forgot to copy,
and a host value (a Python float, a step index, a forecast weight) that changed after capture, show up as wrong
results in tests without a GPU, as they would on one; a host read of a device value during capture is refused, as
a CUDA graph capture refuses it.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..ops.capture import emulated_capture


class CudaGraphError(RuntimeError):
    """A step plan could not be captured in a CUDA graph."""


def _flatten(obj: Any, out: list) -> Any:
    """Replace tensors in a nested structure by their index in ``out``."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
        return ("__tensor__", len(out) - 1)
    if isinstance(obj, dict):
        return {k: _flatten(v, out) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_flatten(v, out) for v in obj)
    return obj


def _rebuild(spec: Any, tensors: list) -> Any:
    if isinstance(spec, tuple) and len(spec) == 2 and spec[0] == "__tensor__":
        return tensors[spec[1]]
    if isinstance(spec, dict):
        return {k: _rebuild(v, tensors) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return type(spec)(_rebuild(v, tensors) for v in spec)
    return spec


def signature(args: dict) -> tuple:
    """Hashable description of a call's arguments: tensor shapes/dtypes/devices and other values."""
    tensors: list = []
    spec = _flatten(args, tensors)
    return (repr(spec), tuple((tuple(t.shape), t.dtype, str(t.device)) for t in tensors))


def _split(args: dict) -> tuple[Any, tuple, list]:
    """(structure with tensors replaced by indices, signature, the tensors) of a call's arguments."""
    tensors: list = []
    spec = _flatten(args, tensors)
    return spec, (repr(spec), tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)), tensors


# ---------------------------------------------------------------------------------------------- backends
class CudaBackend:
    name = "cuda"

    def __init__(self):
        self.stream = None

    def new_pool(self):
        return torch.cuda.graph_pool_handle()

    def warm_up(self, fn: Callable, args: dict, runs: int) -> None:
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for _ in range(runs):
                fn(args)
        torch.cuda.current_stream().wait_stream(self.stream)

    def capture(self, fn: Callable, args: dict, pool, state: list) -> tuple[Any, torch.Tensor]:
        graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            with torch.cuda.graph(graph, pool=pool, stream=self.stream):
                out = fn(args)
        torch.cuda.current_stream().wait_stream(self.stream)
        return graph, out

    @staticmethod
    def replay(graph, out: torch.Tensor) -> None:
        graph.replay()


class _Recorder(TorchDispatchMode):
    """Records every operator a captured function dispatches: ``(op, args, kwargs, output)``."""

    def __init__(self):
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            raise CudaGraphError("the step reads a device value on the host during capture (.item(), bool(tensor), "
                                 "a Python branch on a tensor): a CUDA graph cannot record that")
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _EmulatedGraph:
    """The operators of one capture, replayed on the tensors they used and wrote then (a CUDA graph's kernels with
    their frozen arguments)."""

    def __init__(self, ops: list):
        self.ops = []
        for func, args, kwargs, out in ops:
            ins = {_storage(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
            outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
            # outputs that are views of an input or written in place need no copy: the op updates them itself
            fresh = tuple(i for i, o in enumerate(outs) if _storage(o) not in ins)
            self.ops.append((func, args, kwargs, outs, fresh))

    def replay(self) -> None:
        for func, args, kwargs, outs, fresh in self.ops:
            new = func(*args, **kwargs)
            if fresh:
                news = [o for o in tree_flatten(new)[0] if isinstance(o, torch.Tensor)]
                for i in fresh:
                    outs[i].copy_(news[i])


class EmulatedBackend:
    """CPU stand-in for :class:`CudaBackend` with the same bookkeeping (see the module docstring)."""

    name = "emulated"

    def __init__(self):
        self.replays = 0
        self.captured_runs = 0

    def new_pool(self):
        return object()

    def warm_up(self, fn: Callable, args: dict, runs: int) -> None:
        for _ in range(runs):
            fn(args)

    def capture(self, fn: Callable, args: dict, pool, state: list) -> tuple[Any, torch.Tensor]:
        saved = [t.clone() for t in state]
        # compiled functions are recorded as their eager operators (a dispatch recorder cannot see inside a compiled
        # graph): the same arithmetic, frozen the same way
        with torch.no_grad(), torch.compiler.set_stance("force_eager"), emulated_capture(), _Recorder() as rec:
            out = fn(args)
        self.captured_runs += 1
        for t, s in zip(state, saved):  # a capture records work; it does not do it
            t.copy_(s)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return _EmulatedGraph(rec.ops), out

    def replay(self, graph: _EmulatedGraph, out: torch.Tensor) -> None:
        self.replays += 1
        with torch.no_grad():
            graph.replay()   # writes the captured output tensor, ``out``


# ---------------------------------------------------------------------------------------------- the cache
class _StaticInputs:
    """Static copies of one signature's inputs, and which source tensor each copy holds."""

    def __init__(self, spec: Any, tensors: list):
        self.spec = spec
        self.static = [t.clone() for t in tensors]
        self.args = _rebuild(spec, self.static)
        self.sources = [(t, t._version) for t in tensors]  # strong refs: identity stays meaningful

    def load(self, tensors: list) -> int:
        """Copy the inputs that changed since the last load; return how many were copied."""
        copied = 0
        for i, (src, dst) in enumerate(zip(tensors, self.static)):
            last, version = self.sources[i]
            if src is last and src._version == version:
                continue
            dst.copy_(src, non_blocking=True)
            self.sources[i] = (src, src._version)
            copied += 1
        return copied


GRAPH_MODES = (True, False, "auto", "emulate")


class GraphCache:
    """Captured step graphs of one module; ``backend`` is :class:`CudaBackend` or :class:`EmulatedBackend`.

    The policy both cached transformers (branch level and block level) follow lives here too: which calls
    use graphs (:meth:`applies`), when the step graphs are captured (:meth:`capture_due`: at step 0, at once
    or -- ``"auto"`` -- from the second generation of an input signature), and capturing a module's plans in
    order (:meth:`capture_plans`)."""

    def __init__(self, backend=None, mode: bool | str = True):
        self.backend = backend
        self.mode = mode
        self.pool = None
        self.graphs: dict[tuple, tuple] = {}
        self.inputs: dict[tuple, _StaticInputs] = {}
        self.captures = 0
        self.input_copies = 0
        self.error: str | None = None

    @classmethod
    def for_mode(cls, mode: bool | str) -> "GraphCache":
        """The cache for a module's ``cuda_graphs`` option (True, False, ``"auto"`` or ``"emulate"``)."""
        if mode not in GRAPH_MODES:
            raise ValueError(f"cuda_graphs must be True, False, 'auto' or 'emulate', got {mode!r}")
        return cls(EmulatedBackend() if mode == "emulate" else CudaBackend(), mode)

    def applies(self, x: torch.Tensor) -> bool:
        """Does a call with tensors on ``x``'s device run through graphs? (Never while ``torch.compile`` traces.)"""
        if self.mode is False or torch.compiler.is_compiling():
            return False
        return self.mode == "emulate" or x.device.type == "cuda"

    def require(self, x: torch.Tensor) -> None:
        """Raise the error ``capture()`` gives when graphs do not apply to inputs like ``x``."""
        if not self.applies(x):
            raise ValueError("capture() needs cuda_graphs enabled and inputs on a CUDA device "
                             "(cuda_graphs='emulate' replays on the CPU for tests)")

    def capture_due(self, generations_run: int) -> bool:
        """At step 0 of a signature that has run ``generations_run`` whole generations: capture now?
        (``"auto"`` waits for the second generation, so a module used once never captures.)"""
        return self.mode != "auto" or generations_run > 0

    def capture_plans(self, plans, state: list) -> None:
        """Capture ``(key, args, fn)`` for each of ``plans``, in order (see :meth:`capture`)."""
        for key, args, fn in plans:
            self.capture(key, args, fn, state)

    def num_graphs(self) -> int:
        return len(self.graphs)

    def release(self) -> None:
        self.graphs.clear()
        self.inputs.clear()
        self.pool = None

    def _static(self, args: dict) -> tuple[tuple, _StaticInputs, list]:
        spec, sig, tensors = _split(args)
        st = self.inputs.get(sig)
        if st is None:
            st = self.inputs[sig] = _StaticInputs(spec, tensors)
            self.input_copies += len(tensors)
        return sig, st, tensors

    def captured(self, key: tuple, args: dict) -> bool:
        return (key, _split(args)[1]) in self.graphs

    def capture(self, key: tuple, args: dict, fn: Callable[[dict], torch.Tensor], state: list,
                warm_up_runs: int = 1) -> None:
        """Warm ``fn`` up on the static copies of ``args`` and capture it under ``key``; raises
        :class:`CudaGraphError` on failure. ``state``: the cache buffers (an emulated capture restores them)."""
        sig, st, tensors = self._static(args)
        self.input_copies += st.load(tensors)
        if (key, sig) in self.graphs:
            return
        try:
            if self.pool is None:
                self.pool = self.backend.new_pool()
            self.backend.warm_up(fn, st.args, warm_up_runs)
            graph, out = self.backend.capture(fn, st.args, self.pool, state)
        except Exception as e:  # noqa: BLE001 - reported, with the plan, to the caller
            self.error = f"{type(e).__name__}: {e}"
            raise CudaGraphError(f"CUDA graph capture failed for a step plan ({self.error}). Pass cuda_graphs=False "
                                 f"to run this module eagerly.") from e
        self.graphs[(key, sig)] = (graph, out)
        self.captures += 1

    def run(self, key: tuple, args: dict, fn: Callable[[dict], torch.Tensor]) -> torch.Tensor:
        """Replay ``key``'s graph for ``args`` if it was captured, else run ``fn(args)`` eagerly."""
        out = self.replay(key, args)
        return fn(args) if out is None else out

    def replay(self, key: tuple, args: dict) -> torch.Tensor | None:
        """The output of ``key``'s graph for ``args`` (a fresh tensor), or None if it was not captured."""
        _, sig, tensors = _split(args)
        entry = self.graphs.get((key, sig))
        if entry is None:
            return None
        self.input_copies += self.inputs[sig].load(tensors)
        graph, out = entry
        self.backend.replay(graph, out)
        return out.clone()
