"""An independent reference for branch-level schedules on SD3 / Flux: forward hooks on the original submodules.

Written from the diffusers forwards, without the library's adapters or runtime. The unmodified model runs
every submodule; at a step whose plan computes a unit, a hook records the unit's raw output; at a step
that reuses it, the hook replaces the submodule's output by the last recorded one (or, with a forecast,
by the Lagrange polynomial through the unit's last two / three recorded outputs at their steps). The
block's own forward then applies the gates of the current step, as the model does. Units:

- ``attn1``: ``block.attn`` (its output tuple, image and text, recorded and replaced together);
- ``attn2``, ``ff``, ``ff_context``: ``block.attn2`` / ``block.ff`` / ``block.ff_context``;
- in a Flux single block, ``attn1`` and ``ff`` are the column blocks of ``proj_out``: a hook on
  ``proj_out`` splits its input ``cat(a, m)`` into ``a @ W[:, :dim].T`` and ``m @ W[:, dim:].T + b`` and
  returns their sum with the reused half replaced (the original output where both compute).

A ``B`` in the plan replaces the whole block's outputs by ``in + (out - in)`` of the last step that
computed it (per stream). Steps are given by the caller (``step(s, kwargs)``) or counted from the calls
of the model (:meth:`HookBranchReference.installed`, for pipelines).
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from tests.hook_steps import HookSteps

STREAMS = ("encoder_hidden_states", "hidden_states")  # what all three block kinds return, in this order


def lagrange(s, nodes):
    out = []
    for j, sj in enumerate(nodes):
        w = 1.0
        for m, sm in enumerate(nodes):
            if m != j:
                w *= (s - sm) / (sj - sm)
        out.append(w)
    return out


def blocks_of(model):
    lists = ["transformer_blocks", "single_transformer_blocks"] if type(model).__name__ == "FluxTransformer2DModel" \
        else ["transformer_blocks"]
    return [blk for name in lists for blk in getattr(model, name)]


class HookBranchReference(HookSteps):
    def __init__(self, model, schedule):
        self.model, self.sched = model, schedule
        self.order = {"none": 0, "linear": 1, "quadratic": 2}[schedule.forecast]
        self.blocks = blocks_of(model)
        assert len(self.blocks) == schedule.num_blocks
        self.hist: dict = {}        # (block, unit) -> [(step, output)]
        self.delta: dict = {}       # block -> [residual per stream]
        self.s = 0

    # ------------------------------------------------------------ plan
    def letter(self, b, unit):
        e = self.sched.plan[self.s][b]
        return "B" if e == "B" else e[self.sched.branches.index(unit)]

    def value(self, b, unit, fresh):
        """The unit's output at this step: ``fresh`` (recorded) if computed, else the cached/forecast one."""
        key = (b, unit)
        if self.letter(b, unit) == "C":
            self.hist.setdefault(key, []).append((self.s, fresh))
            return fresh
        hist = self.hist[key][-(self.order + 1):]
        w = lagrange(self.s, [h[0] for h in hist])
        return _combine(w, [h[1] for h in hist])

    # ------------------------------------------------------------ hooks
    def _install(self):
        handles = []
        for b, blk in enumerate(self.blocks):
            if type(blk).__name__ == "FluxSingleTransformerBlock":
                handles.append(blk.proj_out.register_forward_hook(
                    lambda m, a, out, b=b, blk=blk: self._single(b, blk, a[0], out)))
            else:
                handles.append(blk.attn.register_forward_hook(
                    lambda m, a, kw, out, b=b: self._sub(b, "attn1", out), with_kwargs=True))
                for unit in ("attn2", "ff", "ff_context"):
                    mod = getattr(blk, unit, None)
                    if mod is not None:
                        handles.append(mod.register_forward_hook(
                            lambda m, a, kw, out, b=b, unit=unit: self._sub(b, unit, out), with_kwargs=True))
            handles.append(blk.register_forward_hook(
                lambda m, a, kw, out, b=b: self._block(b, m, a, kw, out), with_kwargs=True))
        return handles

    def _sub(self, b, unit, out):
        if self.sched.plan[self.s][b] == "B":
            return None
        if isinstance(out, tuple):
            new = self.value(b, unit, tuple(o.clone() for o in out))
            return tuple(new)
        return self.value(b, unit, out.clone())

    def _single(self, b, blk, inp, out):
        if self.sched.plan[self.s][b] == "B":
            return None
        dim = blk.proj_out.out_features
        w, bias = blk.proj_out.weight, blk.proj_out.bias
        ya = F.linear(inp[..., :dim], w[:, :dim])
        ym = F.linear(inp[..., dim:], w[:, dim:], bias)
        both = self.letter(b, "attn1") == "C" and self.letter(b, "ff") == "C"
        ya, ym = self.value(b, "attn1", ya), self.value(b, "ff", ym)
        return None if both else ya + ym

    def _block(self, b, module, args, kwargs, out):
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        ins = [bound.get(n) for n in STREAMS]
        if self.sched.plan[self.s][b] != "B":
            self.delta[b] = [None if o is None else o - i for o, i in zip(out, ins)]
            return None
        return tuple(None if d is None else i + d for i, d in zip(ins, self.delta[b]))

    # ------------------------------------------------------------ running
    def hooks(self, s: int) -> list:
        """The hooks of step ``s`` (step 0 starts a new generation); the caller removes them."""
        if s == 0:
            self.hist.clear()
            self.delta.clear()
        self.s = s
        return self._install()

    @contextmanager
    def installed(self):
        """Hooks on the model, steps counted from its calls (call ``c`` of a generation is step ``c``)."""
        calls = [-1]

        def on_call(module, args, kwargs):
            calls[0] = (calls[0] + 1) % self.sched.num_steps
            self.s = calls[0]
            if self.s == 0:
                self.hist.clear()
                self.delta.clear()

        handles = [self.model.register_forward_pre_hook(on_call, with_kwargs=True)] + self._install()
        try:
            with torch.no_grad():
                yield
        finally:
            for h in handles:
                h.remove()


def _combine(w, outs):
    if isinstance(outs[0], tuple):
        return tuple(_combine(w, [o[k] for o in outs]) for k in range(len(outs[0])))
    if outs[0] is None:
        return None
    return sum(wj * o for wj, o in zip(w, outs))
