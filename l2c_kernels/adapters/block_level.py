"""The facts schedules need about a model run at block level (branches ``["block"]``).

Families without a branch adapter (Flux, SD3, Wan, ...) are cached per block: see
:mod:`l2c_kernels.adapters.patterns`. This adapter answers what schedule construction asks
(block count, the one ``"block"`` branch, per-block costs); running the blocks is the block-level
runtime's job, so the branch-level entry points refuse with the reason.
"""
from __future__ import annotations

from ..schedule import BLOCK_LEVEL, BLOCK_UNIT
from .base import BlockAdapter
from .patterns import PATTERNS, estimate_block_flops, find_blocks, pattern_for


class BlockLevelAdapter(BlockAdapter):
    """Schedule facts for a model in the block pattern table."""

    model_classes = tuple(sorted(PATTERNS))
    level = BLOCK_LEVEL

    def matches(self, model) -> bool:
        return type(model).__name__ in PATTERNS

    def pattern(self, model):
        return pattern_for(model)

    def blocks(self, model):
        return [ref.module for ref in find_blocks(model)]

    def branches(self, model) -> list[str]:
        return [BLOCK_UNIT]

    def unit_flops(self, model) -> list[float]:
        return estimate_block_flops(model)

    def branch_flops(self, model, tokens=None, text_tokens: int = 8) -> dict:
        costs = self.unit_flops(model)
        return {BLOCK_UNIT: sum(costs) / len(costs)}

    def _refuse(self, model, what: str):
        raise TypeError(f"{type(model).__name__} runs at block level only (branches ['block']): {what} needs a "
                        f"branch adapter (DiTTransformer2DModel, PixArtTransformer2DModel)")

    def prepare(self, model, inputs):
        self._refuse(model, "running the forward in branch pieces")

    def block_context(self, block, ctx):
        raise TypeError("block-level models have no branch context")

    def compute_branch(self, block, name, h, bctx, ctx):
        raise TypeError("block-level models have no branches")

    def branch_gate(self, name, bctx):
        raise TypeError("block-level models have no branches")

    def finish(self, model, h, ctx, inputs):
        self._refuse(model, "running the forward in branch pieces")
