"""The cached outputs one soft sampling trajectory carries (router training): what the soft forward
(``soft_forward.py``) mixes each unit's fresh output into. See ``soft_forward.py`` for the mixing rule and the
linear forecast's state."""
from __future__ import annotations

import torch


class SoftCaches:
    """Cached outputs per (block, slot) carried along one sampling trajectory; a slot is ``(router column,
    stream)`` (a joint block caches its text and image streams under one column)."""

    def __init__(self, num_blocks: int, num_branches: int, forecast: str = "none", branches: list | None = None):
        """``num_blocks`` x ``num_branches``: the router's table these caches serve (the soft forward refuses a
        model of another table). ``branches``: the units the router decides when they are not the model's
        default level (SD3 / Flux branch level: e.g. ``["attn1", "ff", "ff_context"]``); None for the default."""
        if forecast not in ("none", "linear"):
            raise ValueError(f"forecast must be 'none' or 'linear', got {forecast!r}")
        self.forecast = forecast
        self.shape = (int(num_blocks), int(num_branches))
        self.branches = None if branches is None else list(branches)
        self.values: dict = {}   # (block, slot) -> the value the slot contributed last
        self.linear: dict = {}   # (block, slot) -> the linear forecast's (anchor, slope, age)

    def mix(self, b: int, slot, y: torch.Tensor, w) -> torch.Tensor:
        """The value slot ``slot`` of block ``b`` contributes at this step when its fresh output is ``y``, weight
        ``w`` (None: computed)."""
        key = (b, slot)
        c = self.values.get(key)
        if self.forecast == "none":
            mixed = y if (c is None or w is None) else w * y + (1 - w) * c
        else:
            st = self.linear.get(key)
            if w is None:  # full compute
                w = 1.0
            if st is None:  # the first output: nothing to extrapolate from yet
                mixed, st = y, (y, torch.zeros_like(y), 1.0)
            else:
                a, d, k = st
                mixed = w * y + (1 - w) * (c + d)
                st = (w * y + (1 - w) * a, w * (y - a) / k + (1 - w) * d, 1.0 + (1 - w) * k)
            self.linear[key] = st
        self.values[key] = mixed
        return mixed

    def detach_(self) -> "SoftCaches":
        """Cut the graph to earlier steps (step-wise training): values stay, gradients stop here."""
        def d(v):
            return v.detach() if isinstance(v, torch.Tensor) else v

        self.values = {k: d(v) for k, v in self.values.items()}
        self.linear = {k: tuple(d(e) for e in st) for k, st in self.linear.items()}
        return self
