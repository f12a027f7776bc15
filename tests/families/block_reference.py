"""An independent reference for block-level schedules, written with forward hooks on the unmodified model.

Every block still runs; a hook records, at a step that computes the block, each returned stream's
residual ``out - in`` (plain PyTorch), and at a step that reuses it replaces the block's output by
``in + residual`` -- the last recorded one, or with ``forecast="linear"`` / ``"quadratic"`` the
Lagrange polynomial through the block's last two / three recorded residuals evaluated at the current
step. Which arguments are streams, and in which order blocks return them, comes from the test's own
family description (``tests/family_configs.py``), not from the library's pattern table.
"""
from __future__ import annotations

import inspect

import torch


def lagrange(s, nodes):
    out = []
    for j, sj in enumerate(nodes):
        w = 1.0
        for m, sm in enumerate(nodes):
            if m != j:
                w *= (s - sm) / (sj - sm)
        out.append(w)
    return out


class HookBlockReference:
    def __init__(self, model, family, schedule):
        self.model, self.schedule = model, schedule
        self.order = {"none": 0, "linear": 1, "quadratic": 2}[schedule.forecast]
        self.blocks = [(blk, family.returns[name]) for name in family.returns for blk in model._modules[name]]
        assert len(self.blocks) == schedule.num_blocks
        self.history: dict[int, list] = {}  # block -> [(step, [residual per stream]), ...]

    def step(self, s: int, kwargs: dict):
        if s == 0:
            self.history.clear()
        handles = []
        for b, (blk, names) in enumerate(self.blocks):
            sig = inspect.signature(blk.forward)
            compute = self.schedule.plan[s][b] == "C"

            def hook(mod, args, kw, out, b=b, names=names, sig=sig, compute=compute):
                bound = sig.bind(*args, **kw).arguments
                ins = [bound.get(n) for n in names]
                outs = [out] if len(names) == 1 else list(out)
                if compute:
                    self.history.setdefault(b, []).append(
                        (s, [None if o is None else o - i for o, i in zip(outs, ins)]))
                    return None
                hist = self.history[b][-(self.order + 1):]
                w = lagrange(s, [h[0] for h in hist])
                new = []
                for k, i in enumerate(ins):
                    if hist[-1][1][k] is None:
                        new.append(None)
                        continue
                    new.append(i + sum(wj * h[1][k] for wj, h in zip(w, hist)))
                return new[0] if len(names) == 1 else tuple(new)

            handles.append(blk.register_forward_hook(hook, with_kwargs=True))
        try:
            with torch.no_grad():
                return self.model(**kwargs)
        finally:
            for h in handles:
                h.remove()
