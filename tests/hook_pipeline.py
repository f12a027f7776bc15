"""The hook reference (tests/runtime/hook_reference.py) as a drop-in transformer for unmodified
diffusers pipelines: call ``k`` of a generation runs step ``k mod num_steps`` of the schedule on the
unmodified model, so a pipeline's images can be compared with the compiled module's."""
from __future__ import annotations

import torch

from tests.runtime.hook_reference import HookReference


class HookTransformer(torch.nn.Module):
    def __init__(self, model, schedule):
        super().__init__()
        self.model = model
        self.ref = HookReference(model, schedule)
        self.calls = 0

    @property
    def config(self):
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def forward(self, hidden_states, timestep=None, return_dict: bool = True, **kwargs):
        sch = self.ref.schedule
        s = self.calls % sch.num_steps
        self.calls += 1
        t = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        assert abs(t - sch.timesteps[s]) < 1e-3, f"call {self.calls} has timestep {t}, step {s} is {sch.timesteps[s]}"
        out = self.ref.step(s, dict(hidden_states=hidden_states, timestep=timestep, **kwargs))
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)
