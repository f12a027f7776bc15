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

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["original_model"], name)

    @property
    def current_step(self) -> int | None:
        """Index of the step run last (None before the first call or after ``reset``)."""
        return self._step
