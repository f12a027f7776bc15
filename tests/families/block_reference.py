"""An independent reference for block-level schedules, written with forward hooks on the unmodified model.

Every block still runs; a hook records, at a step that computes the block, each returned stream's
residual ``out - in`` (plain PyTorch), and at a step that reuses it replaces the block's output by
``in + residual`` -- the last recorded one, or with ``forecast="linear"`` / ``"quadratic"`` the
Lagrange polynomial through the block's last two / three recorded residuals evaluated at the current
step; with ``"taylor"`` TaylorSeer's second-order expansion, its factors updated at every recorded
residual the way diffusers' ``TaylorSeerCacheConfig`` hook updates them (:func:`taylor_predict`). Which arguments are streams, and in which order blocks return them, comes from the test's own
family description (``tests/family_configs.py``), not from the library's pattern table.
"""
from __future__ import annotations

import inspect
import math

from tests.hook_steps import HookSteps


def lagrange(s, nodes):
    out = []
    for j, sj in enumerate(nodes):
        w = 1.0
        for m, sm in enumerate(nodes):
            if m != j:
                w *= (s - sm) / (sj - sm)
        out.append(w)
    return out


def taylor_predict(s, hist, max_order=2):
    """TaylorSeer's forecast at step ``s`` from every ``(step, value)`` in ``hist`` (oldest first): at each one
    the factors become ``[y, (y - f0) / d, (f1_new - f1_old) / d]`` (``d`` the steps since the last, only as
    many as earlier factors exist), and the forecast is ``sum_i f_i (s - last)^i / i!``."""
    factors, last = [], None
    for sj, y in hist:
        new = [y]
        if last is not None:
            for i in range(min(len(factors), max_order)):
                new.append((new[i] - factors[i]) / (sj - last))
        factors, last = new, sj
    h = s - last
    return sum(f * h ** i / math.factorial(i) for i, f in enumerate(factors))


class HookBlockReference(HookSteps):
    def __init__(self, model, family, schedule):
        self.model, self.schedule = model, schedule
        self.order = {"none": 0, "linear": 1, "quadratic": 2, "taylor": 2}[schedule.forecast]
        self.blocks = [(blk, family.returns[name]) for name in family.returns for blk in model._modules[name]]
        assert len(self.blocks) == schedule.num_blocks
        self.history: dict[int, list] = {}  # block -> [(step, [residual per stream]), ...]

    def hooks(self, s: int) -> list:
        """The hooks of step ``s`` on every block (step 0 starts a new generation); the caller removes them."""
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
                    elif self.schedule.forecast == "taylor":  # every recorded residual, not just the last three
                        new.append(i + taylor_predict(s, [(h[0], h[1][k]) for h in self.history[b]]))
                    else:
                        new.append(i + sum(wj * h[1][k] for wj, h in zip(w, hist)))
                return new[0] if len(names) == 1 else tuple(new)

            handles.append(blk.register_forward_hook(hook, with_kwargs=True))
        return handles
