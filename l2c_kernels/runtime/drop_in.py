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
        return next(self.original_model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.original_model.parameters()).device

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["original_model"], name)

    @property
    def current_step(self) -> int | None:
        """Index of the step run last (None before the first call or after ``reset``)."""
        return self._step
