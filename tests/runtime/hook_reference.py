"""An independent, slow reference for cache schedules, written with forward hooks.

It runs the *unmodified* diffusers model and, per the schedule, records each branch module's
output (``attn1`` / ``attn2`` / ``ff``) when it is computed and substitutes the recorded output
when it is reused; the block itself then applies the current step's gate. Whole-block reuse
records ``out - in`` of the block and returns ``in + cached``. CFG-mean cross-attention caches
the mean of the two batch halves and substitutes it for both. ``forecast="linear"`` substitutes
``y1 + (s - s1) / (s1 - s0) * (y1 - y0)`` from the branch's last two computations (steps s0 < s1);
``"quadratic"`` the Lagrange parabola through its last three (linear while only two exist);
``"taylor"`` TaylorSeer's second-order expansion with its factors updated at every computation
(``tests/families/block_reference.taylor_predict``).
"""
from __future__ import annotations

import torch

from ..families.block_reference import taylor_predict


class HookReference:
    def __init__(self, model, schedule):
        self.model, self.schedule = model, schedule
        self.branch_cache: dict = {}
        self.block_cache: dict = {}
        self.history: dict = {}  # (block, branch) -> [(step, output), ...] of its computations

    def step(self, s: int, inputs: dict) -> torch.Tensor:
        sch, handles = self.schedule, []
        if s == 0:  # a new generation
            self.history.clear()
        blocks = list(self.model.transformer_blocks)
        for b, block in enumerate(blocks):
            entry = sch.plan[s][b]
            if entry == "B":
                def block_hook(mod, args, kwargs, out, b=b):
                    return args[0] + self.block_cache[b]
                handles.append(block.register_forward_hook(block_hook, with_kwargs=True))
                # skip nothing else: the hooked block still runs, its output is replaced
                continue

            def pre(mod, args, kwargs, b=b):
                self._block_in = args[0].clone() if args else kwargs["hidden_states"].clone()
            def post(mod, args, kwargs, out, b=b):
                self.block_cache[b] = out - self._block_in
            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(block.register_forward_hook(post, with_kwargs=True))
            for i, name in enumerate(sch.branches):
                mod = getattr(block, name)
                compute = entry[i] == "C"
                cfg_mean = name == "attn2" and sch.attn2_cache == "cfg_mean"

                def hook(m, args, out, key=(b, i), compute=compute, cfg_mean=cfg_mean):
                    if compute:
                        if cfg_mean:
                            h = out.shape[0] // 2
                            self.branch_cache[key] = ((out[:h] + out[h:]) / 2).clone()
                        else:
                            self.branch_cache[key] = out.clone()
                            self.history.setdefault(key, []).append((s, out.double()))
                        return out
                    cached = self.branch_cache[key]
                    if cfg_mean:
                        return torch.cat([cached, cached])
                    n = {"none": 1, "linear": 2, "quadratic": 3, "taylor": 3}[sch.forecast]
                    pts = self.history[key][-n:]
                    if len(pts) == 1:
                        return cached
                    if sch.forecast == "taylor":
                        return taylor_predict(s, self.history[key]).to(out.dtype)
                    # Lagrange form: independent of the runtime's Newton form with stored differences
                    y = 0
                    for j, (sj, yj) in enumerate(pts):
                        w = 1.0
                        for m, (sm, _) in enumerate(pts):
                            if m != j:
                                w *= (s - sm) / (sj - sm)
                        y = y + w * yj
                    return y.to(out.dtype)
                handles.append(mod.register_forward_hook(hook))
        try:
            with torch.no_grad():
                return self.model(**inputs).sample
        finally:
            for h in handles:
                h.remove()
