"""What every module ``compile_schedule`` returns shares: it stands in for the diffusers transformer it wraps.

A pipeline reads ``config``, ``dtype``, ``device`` and any other attribute off ``pipe.transformer``; these come
from ``original_model`` (registered as a submodule, so ``.to()`` / ``.half()`` reach the shared weights).
"""
from __future__ import annotations

import torch
from torch import nn


class DropInModule(nn.Module):
    """Base of the branch-level and block-level cached transformers (they set ``original_model``, ``_step``)."""

    @property
    def config(self):
        return self.original_model.config

    @property
    def dtype(self) -> torch.dtype:
        return self._weight().dtype

    @property
    def device(self) -> torch.device:
        return self._weight().device

    def _weight(self) -> torch.Tensor:
        """One parameter of the wrapped model (the weights' dtype and device), read every call: where it is
        (a module and a parameter name) is found once, so a call does not walk the module tree; ``.to()`` and a
        replaced parameter are followed."""
        at = self.__dict__.get("_weight_at")
        if at is None:
            at = self.__dict__["_weight_at"] = next(
                ((m, n) for m in self.original_model.modules() for n, p in m._parameters.items() if p is not None), ())
        w = at[0]._parameters.get(at[1]) if at else None
        return w if w is not None else next(self.original_model.parameters())

    def _check_latents(self, x) -> None:
        """(Every runtime level, before any block runs.) The latents fit the weights (dtype and device: metadata, free) and are finite (a read of the data:
        done where it costs no device sync -- CPU tensors -- or with ``timestep_check="strict"``)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"hidden_states must be a tensor, got {type(x).__name__}")
        w = self._weight()
        if x.dtype != w.dtype:
            raise ValueError(f"hidden_states are {str(x.dtype).removeprefix('torch.')} but the model's weights are "
                             f"{str(w.dtype).removeprefix('torch.')}: cast the latents (or the model) so they match")
        if x.device != w.device:
            raise ValueError(f"hidden_states are on {x.device} but the model's weights are on {w.device}")
        if self.timestep_check == "strict" or (self.timestep_check == "host" and x.device.type == "cpu"):
            if not bool(torch.isfinite(x).all()):
                bad = "NaN" if bool(torch.isnan(x).any()) else "infinite values"
                raise ValueError(f"hidden_states contain {bad}: the sampler diverged or the inputs are corrupt")

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["original_model"], name)

    @property
    def current_step(self) -> int | None:
        """Index of the step run last (None before the first call or after ``reset``)."""
        return self._step
