"""Block-family adapters: one file per family of diffusers transformer blocks."""
from __future__ import annotations

from ..schedule import BLOCK_UNIT, register_families
from .ada_norm_single import AdaNormSingleAdapter
from .ada_norm_zero import AdaNormZeroAdapter
from .base import BlockAdapter, StepContext, StepInputs
from .block_level import BlockLevelAdapter
from .mmdit_branches import TwoStreamBranchAdapter

# branch adapters first; the block-level adapter (pattern table) serves every other family it knows
ADAPTERS: list[BlockAdapter] = [AdaNormZeroAdapter(), AdaNormSingleAdapter(), BlockLevelAdapter()]
# branch adapters that a schedule must ask for by naming branches (their families default to block level)
OPT_IN_BRANCH_ADAPTERS: list[BlockAdapter] = [TwoStreamBranchAdapter()]


def register_adapter(adapter: BlockAdapter) -> None:
    """Add support for another block family (checked before the built-in ones)."""
    ADAPTERS.insert(0, adapter)


def adapter_for(model, branches=None) -> BlockAdapter:
    """The adapter that drives ``model`` at the level ``branches`` mean; the one place a model's level is decided.

    ``branches=None``: the model's default level (its branch adapter if one matches, else whole blocks when its
    family is in the block pattern table); ``["block"]``: block level; other names: the opt-in branch adapter
    they belong to (SD3 / Flux units), else the default one (whose schedule check then names what it runs)."""
    inner = getattr(model, "original_model", model)  # a compiled module reports its original
    block_level = branches is not None and list(branches) == [BLOCK_UNIT]
    if branches is not None and not block_level:
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


def level_for(model, branches=None) -> str:
    """The level (``l2c_kernels.schedule.LEVELS``) a schedule over ``branches`` runs ``model`` at."""
    return adapter_for(model, branches).level


__all__ = ["BlockLevelAdapter", "TwoStreamBranchAdapter", "OPT_IN_BRANCH_ADAPTERS", "BlockAdapter", "StepContext", "StepInputs", "adapter_for", "level_for", "register_adapter", "ADAPTERS"]


register_families(adapter_for)   # the schedule format reads a model's layout through these
