"""Skipping ``torch.compile``'s guards on steps that already ran compiled with the same kind of inputs.

A static schedule runs the same block kinds at a step in every generation. Once a step has run compiled on
inputs of one signature (shapes, strides, dtypes, devices, plain argument values), every graph it calls exists
and its guards passed for exactly those inputs; on the next generation only the guards that tell the compiled
kinds apart need evaluating (torch's ``skip_guard_eval_unsafe`` stance). What makes that stance unsafe in
general -- an input the guards would have rejected -- is excluded by the signature: a step with a new signature
runs with every guard (and compiles what it needs), and only then counts as warm.

The guards left are those that differ between the compiled entries of one code object. Telling block kinds apart
that way proved unreliable (with two kinds in one function the stance ran a store-less graph at a step that
stores: ``tests/runtime/test_compiled_kinds.py``), so every kind has a compiled function of its own
(``CachedTransformer._compiled_fn``) and the entries of one function differ only in input shapes. Blocks of
different structures sharing one compiled function (SD3's last block, Flux's double and single blocks at block
level) are told apart by guards on the modules, which the stance skips, so it is used only where every block has
the same structure (:func:`same_structure`).
"""
from __future__ import annotations

import contextlib

import torch


def signature(v):
    """What a compiled step's guards depend on in its arguments, hashable: tensors by shape, strides, dtype,
    device and autograd flag, plain values by value, containers element by element, anything else by identity."""
    if isinstance(v, torch.Tensor):
        return (tuple(v.shape), v.stride(), v.dtype, v.device, v.requires_grad)
    if v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.device)):
        return v
    if isinstance(v, dict):
        return tuple((k, signature(x)) for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return (type(v),) + tuple(signature(x) for x in v)
    return (type(v), id(v))


def same_structure(blocks) -> bool:
    """Whether every block has the same class and the same parameter names and shapes."""
    def structure(b):
        return type(b), tuple((n, tuple(p.shape)) for n, p in b.named_parameters())

    return len({structure(b) for b in blocks}) <= 1


class WarmSteps:
    """The (step, input signature) keys that ran compiled; ``run(key)`` is the context a step runs in."""

    def __init__(self):
        self._keys: set = set()

    def __len__(self) -> int:
        return len(self._keys)

    @contextlib.contextmanager
    def run(self, key):
        """Guards skipped where ``key`` ran before (None: not compiled, nothing changes); ``key`` is warm after a
        run that did not raise."""
        if key is None:
            yield
            return
        warm = key in self._keys
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True) if warm else contextlib.nullcontext():
            yield
        self._keys.add(key)
