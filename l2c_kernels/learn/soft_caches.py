"""Per (block, branch) cached outputs carried along one soft sampling trajectory (router training): what every soft
forward (``soft_forward.py``, ``soft_blocks.py``, ``soft_branches.py``) mixes fresh outputs into. See
``soft_forward.py`` for the mixing rule and the linear forecast's state."""
from __future__ import annotations

import torch


class SoftCaches:
    """Per (block, branch) cached outputs carried along one sampling trajectory."""

    def __init__(self, num_blocks: int, num_branches: int, forecast: str = "none", branches: list | None = None):
        """``branches``: the units the router decides when they are not the model's default level (SD3 / Flux
        branch level: e.g. ``["attn1", "ff", "ff_context"]``; :func:`soft_forward` then runs the branch-level
        soft forward of ``soft_branches.py``); None for the default level."""
        if forecast not in ("none", "linear"):
            raise ValueError(f"forecast must be 'none' or 'linear', got {forecast!r}")
        self.forecast = forecast
        self.branches = None if branches is None else list(branches)
        self.values: list[list[torch.Tensor | None]] = [[None] * num_branches for _ in range(num_blocks)]
        # linear forecast state per (block, branch): (anchor, slope, age) or None before the first output
        self.linear: list[list[tuple | None]] = [[None] * num_branches for _ in range(num_blocks)]

    def mix(self, b: int, i: int, y: torch.Tensor, w) -> torch.Tensor:
        """The value branch (b, i) contributes at this step when its fresh output is ``y``, weight ``w``."""
        c = self.values[b][i]
        if self.forecast == "none":
            mixed = y if (c is None or w is None) else w * y + (1 - w) * c
        else:
            st = self.linear[b][i]
            if w is None:  # full compute
                w = 1.0
            if st is None:  # the first output: nothing to extrapolate from yet
                mixed, st = y, (y, torch.zeros_like(y), 1.0)
            else:
                a, d, k = st
                mixed = w * y + (1 - w) * (c + d)
                st = (w * y + (1 - w) * a, w * (y - a) / k + (1 - w) * d, 1.0 + (1 - w) * k)
            self.linear[b][i] = st
        self.values[b][i] = mixed
        return mixed

    def detach_(self) -> "SoftCaches":
        """Cut the graph to earlier steps (step-wise training): values stay, gradients stop here."""
        def d(v):
            return v.detach() if isinstance(v, torch.Tensor) else v

        self.values = [[d(v) for v in row] for row in self.values]
        self.linear = [[None if st is None else tuple(d(e) for e in st) for st in row] for row in self.linear]
        return self
