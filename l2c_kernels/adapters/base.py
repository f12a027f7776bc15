"""What the runtime needs to know about a family of transformer blocks.

An adapter splits a diffusers transformer's forward into three parts the runtime drives:
``prepare`` (patch embedding, timestep/condition embeddings), per-block branches
(``compute_branch`` returns a branch's raw output before its gate, ``branch_gate`` the gate
applied to it), and ``finish`` (final norm, projection, unpatchify). The runtime owns the
residual stream and the caches; the adapter never stores anything between calls.
Adding a model family (SD3, Flux, ...) means adding one adapter file.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from ..schedule import BRANCH_LEVEL


@dataclass
class StepInputs:
    """A transformer call's arguments, bound to the original forward's parameter names."""

    args: dict
    return_dict: bool = True


@dataclass
class StepContext:
    """Per-call state shared by all blocks (embeddings, masks, shapes)."""

    batch: int
    values: dict = field(default_factory=dict)


class BlockAdapter:
    """Base class; subclasses describe one block family."""

    #: diffusers model classes this adapter drives
    model_classes: tuple[str, ...] = ()
    #: the level its schedules run at (``l2c_kernels.schedule.LEVELS``): a branch adapter runs branch pieces
    level: str = BRANCH_LEVEL

    def matches(self, model) -> bool:
        return type(model).__name__ in self.model_classes

    # -- model facts ------------------------------------------------------------------
    def blocks(self, model) -> list[torch.nn.Module]:
        return list(model.transformer_blocks)

    def num_blocks(self, model) -> int:
        return len(self.blocks(model))

    def branches(self, model) -> list[str]:
        raise NotImplementedError

    def branch_flops(self, model, tokens: int | None = None, text_tokens: int = 8) -> dict:
        """Multiply-accumulates of one branch for one sample (all blocks are alike)."""
        raise NotImplementedError

    # -- inputs ---------------------------------------------------------------------
    def bind(self, model, args: tuple, kwargs: dict) -> StepInputs:
        sig = inspect.signature(type(model).forward)
        bound = sig.bind(model, *args, **kwargs)
        bound.apply_defaults()
        a = dict(bound.arguments)
        a.pop("self", None)
        rd = a.pop("return_dict", True)
        return StepInputs(args=a, return_dict=True if rd is None else bool(rd))

    def timestep_tensor(self, inputs: StepInputs) -> Any:
        return inputs.args.get("timestep")

    def hidden_input(self, inputs: StepInputs) -> torch.Tensor:
        return inputs.args["hidden_states"]

    # -- the forward in pieces ------------------------------------------------------
    def prepare(self, model, inputs: StepInputs) -> tuple[torch.Tensor, StepContext]:
        raise NotImplementedError

    def block_context(self, block, ctx: StepContext) -> dict:
        """Per-block modulation (shift/scale/gate vectors) for the current step."""
        raise NotImplementedError

    def traced_context(self, block, ctx: StepContext) -> StepContext:
        """The step context as ``torch.compile``'d block work sees it for ``block``: host-side caches that are
        looked up by block (which a traced function would bake in as constants, one graph per block) resolved
        on the host to this block's tensors. Default: ``ctx`` itself."""
        return ctx

    def block_gates(self, block, ctx: StepContext) -> dict:
        """What :meth:`branch_gate` needs when the block computes no branch at this step (every branch
        reused): by default the whole :meth:`block_context`; families whose gates are a slice of a larger
        projection compute just that slice."""
        return self.block_context(block, ctx)

    def compute_branch(self, block, name: str, h: torch.Tensor, bctx: dict, ctx: StepContext) -> torch.Tensor:
        """The branch's raw output (before its gate) for residual stream ``h``."""
        raise NotImplementedError

    def branch_gate(self, name: str, bctx: dict) -> torch.Tensor | None:
        raise NotImplementedError

    def finish(self, model, h: torch.Tensor, ctx: StepContext, inputs: StepInputs):
        raise NotImplementedError

    # -- helpers --------------------------------------------------------------------
    @staticmethod
    def unpatchify(h: torch.Tensor, height: int, width: int, patch: int, out_channels: int) -> torch.Tensor:
        h = h.reshape(-1, height, width, patch, patch, out_channels)
        h = torch.einsum("nhwpqc->nchpwq", h)
        return h.reshape(-1, out_channels, height * patch, width * patch)

    @staticmethod
    def attention_macs(tokens: int, dim: int, kv_tokens: int | None = None, kv_dim: int | None = None) -> int:
        kv_tokens = tokens if kv_tokens is None else kv_tokens
        kv_dim = dim if kv_dim is None else kv_dim
        proj = tokens * dim * dim * 2 + kv_tokens * kv_dim * dim * 2  # q, out; k, v
        return int(proj + 2 * tokens * kv_tokens * dim)

    @staticmethod
    def ff_macs(tokens: int, ff: torch.nn.Module) -> int:
        macs = 0
        for m in ff.modules():
            if isinstance(m, torch.nn.Linear):
                macs += tokens * m.in_features * m.out_features
        return int(macs)
