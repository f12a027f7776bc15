"""An independent plain-PyTorch reference of asynchronous denoising (AsyncDiff), written with forward
pre-hooks on the *unmodified* diffusers model (nothing from ``l2c_kernels.parallel``).

The blocks are cut into components ``ranges = [(0, a1), (a1, a2), ..., (a_{N-1}, depth)]``. A
pre-hook on the first block of component ``n >= 1`` reads the residual stream arriving there (the
output of component ``n-1`` at this step) and, on an asynchronous step, replaces it with what
component ``n-1`` produced at the *previous* step. One call of the whole model then computes
exactly what N processes compute at once: component 0 on the fresh latents, component ``n`` on the
stale output of component ``n-1``, the final layer on the last component's output.

* Warm-up steps (``step < warm_up``) run the model unchanged and record the boundaries.
* ``stride=1``: every later step is one such call.
* ``stride=2``: the steps after the warm-up go in pairs ``(s, s+1)``. The prediction for ``s`` is the
  last component run on the stale input, conditioned on ``t_s``; the prediction for ``s+1`` and the
  new boundaries come from one call conditioned on ``t_{s+1}`` on the latents of step ``s`` (the
  latents passed at step ``s+1`` are not used). ``t_{s+1}`` past the last step is the last timestep.
* With a cache schedule (``schedule``), the hook reference of the schedule runs inside the same
  call, so every block's cache is filled and read along the asynchronous trajectory (stride 1: each
  block belongs to one component, whose process is the only one to run it after the warm-up).
"""
from __future__ import annotations

import torch

from tests.tiny_models import StandIn


class AsyncReference(StandIn):
    def __init__(self, model, ranges, timesteps, warm_up: int, stride: int = 1, schedule=None):
        super().__init__()
        if schedule is not None and stride != 1:
            raise NotImplementedError("the reference composes a cache schedule with stride 1 only")
        if len(ranges) < 2:
            raise ValueError("asynchronous denoising needs at least two components")
        self.model, self.ranges, self.warm_up, self.stride = model, [tuple(r) for r in ranges], warm_up, stride
        self.timesteps = [float(t) for t in timesteps]
        self.hook_ref = None
        if schedule is not None:
            from tests.runtime.hook_reference import HookReference

            self.hook_ref = HookReference(model, schedule)
        self.calls = 0
        self.stale: list | None = None
        self.pending: torch.Tensor | None = None

    def _call(self, step: int, inputs: dict, replace: dict) -> tuple[torch.Tensor, list]:
        """One model call; ``replace[n]`` (component n >= 1) replaces component n's input. Returns the
        output and the residual stream arriving at every component boundary (before replacement)."""
        blocks = list(self.model.transformer_blocks)
        seen: dict = {}
        handles = []
        for n, (start, _) in enumerate(self.ranges[1:], 1):
            def pre(mod, args, kwargs, n=n):
                h = args[0] if args else kwargs["hidden_states"]
                seen[n] = h.clone()
                if n not in replace:
                    return None
                if args:
                    return (replace[n],) + tuple(args[1:]), kwargs
                return args, dict(kwargs, hidden_states=replace[n])
            handles.append(blocks[start].register_forward_pre_hook(pre, with_kwargs=True))
        try:
            with torch.no_grad():
                if self.hook_ref is not None:
                    out = self.hook_ref.step(step, inputs)
                else:
                    out = self.model(**inputs).sample
        finally:
            for h in handles:
                h.remove()
        return out, [seen[n] for n in range(1, len(self.ranges))]

    def forward(self, hidden_states, timestep=None, return_dict: bool = True, **kwargs):
        steps = len(self.timesteps)
        step = self.calls % steps
        self.calls += 1
        t = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        assert abs(t - self.timesteps[step]) < 1e-3, (step, t, self.timesteps[step])
        inputs = dict(hidden_states=hidden_states, timestep=timestep, **kwargs)
        last = len(self.ranges) - 1
        if step < self.warm_up:
            out, self.stale = self._call(step, inputs, {})
        elif self.stride == 1:
            out, self.stale = self._call(step, inputs, {n: self.stale[n - 1] for n in range(1, last + 1)})
        elif (step - self.warm_up) % 2 == 1:  # the second step of a pair: computed in the first one's call
            out = self.pending
        else:
            # prediction for step s: the last component on its stale input, conditioned on t_s
            out, _ = self._call(step, inputs, {last: self.stale[last - 1]})
            t_next = self.timesteps[min(step + 1, steps - 1)]
            ahead = dict(inputs, timestep=torch.full_like(timestep, t_next) if isinstance(timestep, torch.Tensor)
                         else t_next)
            self.pending, self.stale = self._call(step + 1, ahead, {n: self.stale[n - 1] for n in range(1, last + 1)})
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)
