"""Block-family adapters: one file per family of diffusers transformer blocks."""
from __future__ import annotations

from ..schedule import register_families
from .ada_norm_single import AdaNormSingleAdapter
from .ada_norm_zero import AdaNormZeroAdapter
from .base import BlockAdapter, StepContext, StepInputs
from .block_level import BLOCK_BRANCH, BlockLevelAdapter
from .mmdit_branches import TwoStreamBranchAdapter

# branch adapters first; the block-level adapter (pattern table) serves every other family it knows
ADAPTERS: list[BlockAdapter] = [AdaNormZeroAdapter(), AdaNormSingleAdapter(), BlockLevelAdapter()]
# branch adapters that a schedule must ask for by naming branches (their families default to block level)
OPT_IN_BRANCH_ADAPTERS: list[BlockAdapter] = [TwoStreamBranchAdapter()]


def register_adapter(adapter: BlockAdapter) -> None:
    """Add support for another block family (checked before the built-in ones)."""
    ADAPTERS.insert(0, adapter)


def adapter_for(model, block_level: bool = False, branch_level: bool = False) -> BlockAdapter:
    """The adapter that drives ``model``: its branch adapter if one matches (and ``block_level`` is False),
    else the block-level adapter when its family is in the block pattern table. ``branch_level=True`` (a
    schedule that names branches) also finds the opt-in branch adapters (SD3 / Flux units)."""
    inner = getattr(model, "original_model", model)  # a compiled module reports its original
    if branch_level and not block_level:
        for ad in OPT_IN_BRANCH_ADAPTERS:
            if ad.matches(inner):
                return ad
    for ad in ADAPTERS:
        if block_level and not isinstance(ad, BlockLevelAdapter):
            continue
        if ad.matches(inner):
            if isinstance(ad, BlockLevelAdapter):
                ad.pattern(inner)  # refuses, naming the reason, a model whose blocks do not fit
            return ad
    from .patterns import pattern_for

    pattern_for(inner)  # raises with the reason (refused family, or not in the table)
    raise TypeError(f"{type(inner).__name__} is not supported")


__all__ = ["BLOCK_BRANCH", "BlockLevelAdapter", "TwoStreamBranchAdapter", "OPT_IN_BRANCH_ADAPTERS", "BlockAdapter", "StepContext", "StepInputs", "adapter_for", "register_adapter", "ADAPTERS"]


register_families(adapter_for, OPT_IN_BRANCH_ADAPTERS)   # the schedule format reads a model's layout through these
