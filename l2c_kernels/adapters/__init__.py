"""Block-family adapters: one file per family of diffusers transformer blocks."""
from __future__ import annotations

from .ada_norm_single import AdaNormSingleAdapter
from .ada_norm_zero import AdaNormZeroAdapter
from .base import BlockAdapter, StepContext, StepInputs

ADAPTERS: list[BlockAdapter] = [AdaNormZeroAdapter(), AdaNormSingleAdapter()]


def register_adapter(adapter: BlockAdapter) -> None:
    """Add support for another block family (checked before the built-in ones)."""
    ADAPTERS.insert(0, adapter)


def adapter_for(model) -> BlockAdapter:
    inner = getattr(model, "original_model", model)  # a compiled module reports its original
    for ad in ADAPTERS:
        if ad.matches(inner):
            return ad
    supported = sorted({c for ad in ADAPTERS for c in ad.model_classes})
    raise TypeError(f"{type(inner).__name__} is not supported; supported transformers: {', '.join(supported)}")


__all__ = ["BlockAdapter", "StepContext", "StepInputs", "adapter_for", "register_adapter", "ADAPTERS"]
