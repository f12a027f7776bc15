"""CUDA graphs for static step plans: one graph per (plan, input signature).

Inputs are copied into static buffers owned per signature, every graph shares one memory
pool, caches live outside the graphs, and the first run of each plan runs eagerly (doing the
real work and the warm-up) before the graph is captured. A capture failure disables graphs
for the module with a single warning and everything keeps running eagerly.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch


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


class GraphCache:
    def __init__(self):
        self.pool = None
        self.graphs: dict[tuple, tuple] = {}
        self.static_inputs: dict[tuple, tuple] = {}
        self.disabled = False
        self.captures = 0
        self.stream = None

    def num_graphs(self) -> int:
        return len(self.graphs)

    def release(self) -> None:
        self.graphs.clear()
        self.static_inputs.clear()
        self.pool = None

    def run(self, plan_key: tuple, args: dict, fn: Callable[[dict], torch.Tensor]) -> torch.Tensor:
        """Run ``fn(args)`` for this plan through a CUDA graph (capturing it on first use)."""
        sig = signature(args)
        key = (plan_key, sig)
        entry = self.graphs.get(key)
        if entry is not None:
            graph, static_out = entry
            self._load(sig, args)
            graph.replay()
            return static_out.clone()
        # first time: the real run, on the capture stream so it is also the warm-up; then capture
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            out = fn(args)
        torch.cuda.current_stream().wait_stream(self.stream)
        if not self.disabled:
            try:
                self._capture(key, sig, args, fn)
            except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager
                self.disabled = True
                self.release()
                warnings.warn(f"l2c_kernels: CUDA graph capture failed ({type(e).__name__}: {e}); "
                              f"running this module eagerly from now on", RuntimeWarning, stacklevel=3)
        return out

    def _load(self, sig: tuple, args: dict) -> dict:
        tensors: list = []
        spec = _flatten(args, tensors)
        static = self.static_inputs.get(sig)
        if static is None:
            static_tensors = [t.clone() for t in tensors]
            self.static_inputs[sig] = (spec, static_tensors)
        else:
            static_tensors = static[1]
            for dst, src in zip(static_tensors, tensors):
                dst.copy_(src, non_blocking=True)
        return _rebuild(spec, static_tensors)

    def _capture(self, key, sig, args, fn) -> None:
        static_args = self._load(sig, args)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        stream = self.stream
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                static_out = fn(static_args)
        torch.cuda.current_stream().wait_stream(stream)
        self.graphs[key] = (graph, static_out)
        self.captures += 1
