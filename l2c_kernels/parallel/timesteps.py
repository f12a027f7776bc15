"""The sampler's timestep for the value a pipeline passes to the transformer, and back.

Flux-like pipelines call the transformer with ``t / 1000``, Lumina2 with ``1 - t / 1000``; AsyncDenoiser
tracks steps, compares ``timesteps=[...]`` and conditions stride-denoising rounds on coming steps in the
*sampler's* timesteps (``pipe.scheduler.timesteps``). The maps come from the block pattern table
(:mod:`l2c_kernels.adapters.patterns`); all of them are affine, so the inverse is read from two points.
"""
from __future__ import annotations

from ..adapters.patterns import PATTERNS, TIMESTEP_MAPS


class TimestepScale:
    """``to_sampler(value)`` and its inverse ``to_model(t)`` for one model (identity where the family passes
    the sampler's timestep unchanged)."""

    def __init__(self, model):
        inner = getattr(model, "original_model", model)
        fam = PATTERNS.get(type(inner).__name__)
        self.name = fam.timestep_map if fam is not None else "same"
        self._model = inner
        self._map = TIMESTEP_MAPS[self.name]
        f0, f1 = float(self._map(inner, 0.0)), float(self._map(inner, 1.0))
        if f1 == f0:
            raise ValueError(f"timestep map {self.name!r} is constant")
        self._offset, self._slope = f0, f1 - f0
        for x in (0.25, 3.0):  # the inverse below holds for affine maps only
            if abs(float(self._map(inner, x)) - (f0 + x * self._slope)) > 1e-9 * max(1.0, abs(f1)):
                raise ValueError(f"timestep map {self.name!r} is not affine")

    @property
    def identity(self) -> bool:
        return self.name == "same"

    def to_sampler(self, value):
        if value is None or self.identity:
            return value
        return float(f"{self._offset + self._slope * float(value):.7g}")  # pipelines divide in float32

    def to_model(self, t):
        if self.identity:
            return t
        return (float(t) - self._offset) / self._slope
