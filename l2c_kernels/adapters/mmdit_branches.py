"""Branch-level facts of the two-stream (MMDiT) families: SD3 / SD3.5 and Flux.1.

Each block is split into *units* that are computed or reused separately (Learning-to-Cache's
branches). A unit's output is cached raw, before its adaLN-Zero gate; the gates are recomputed from
the current step's embedding every step. The units, named after the diffusers submodules:

======================  =====================================================================
``attn1``               joint attention over text and image tokens (``block.attn``): its image and
                        text outputs are one unit, computed or reused together. In a Flux single
                        block: the attention half, i.e. ``attn`` and its share of ``proj_out``.
``attn2``               SD3.5's extra image self-attention (``block.attn2``, blocks with
                        ``use_dual_attention``).
``ff``                  the image stream's MLP (``block.ff``). In a Flux single block: the MLP half,
                        ``proj_mlp`` and its share of ``proj_out`` (with ``proj_out``'s bias).
``ff_context``          the text stream's MLP (``block.ff_context``).
======================  =====================================================================

A Flux single block feeds the attention and MLP halves through one linear layer:
``proj_out(cat(a, m)) = W_a a + (W_m m + b)``. Each half's projected contribution is its own unit, so
reusing one half skips its share of ``proj_out`` too (``proj_out`` is 5/12 of the block's weights).

**Branches of a schedule are the union over the model's block kinds** (in the order above), and a
branch a block does not have (``ff_context`` in a Flux single block or in SD3's last block, which has
``context_pre_only``; ``attn2`` in a block without dual attention) is *not applicable*: it is always
written ``C`` by :meth:`~l2c_kernels.Schedule.from_mask`, costs 0 FLOPs in ``unit_branch_flops`` and
is ignored by the runtime whatever its letter.

Branch level is opt-in for these families (block level, ``["block"]``, stays their default): name the
branches, e.g. ``Schedule.full(model, timesteps, branches=branch_names(model))`` or
``Schedule.from_mask(model, timesteps, mask, branches=["attn1", "ff", "ff_context"])``.
"""
from __future__ import annotations

import torch

from ..schedule import TWO_STREAM_LEVEL
from .base import BlockAdapter
from .patterns import BlockPatternError, find_blocks, pattern_for

BRANCH_ORDER = ("attn1", "attn2", "ff", "ff_context")
MODEL_CLASSES = ("FluxTransformer2DModel", "SD3Transformer2DModel")
BLOCK_CLASSES = ("JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")

# defaults of the cost estimate when no call is at hand (``measure_branch_flops`` counts a real call):
# SD3 at its config's sample size with CLIP 77 + T5 256 text tokens; Flux at 1024 x 1024 (4096 packed
# tokens) with 512 T5 tokens.
DEFAULT_TEXT_TOKENS = {"SD3Transformer2DModel": 333, "FluxTransformer2DModel": 512}


def block_branches(block: torch.nn.Module) -> tuple[str, ...]:
    """The units one block has, in :data:`BRANCH_ORDER`."""
    cls = type(block).__name__
    if cls == "JointTransformerBlock":
        out = ["attn1"]
        if getattr(block, "use_dual_attention", False):
            out.append("attn2")
        out.append("ff")
        if not block.context_pre_only:
            out.append("ff_context")
        return tuple(out)
    if cls == "FluxTransformerBlock":
        return ("attn1", "ff", "ff_context")
    if cls == "FluxSingleTransformerBlock":
        return ("attn1", "ff")
    raise BlockPatternError(f"{cls} has no branch-level adapter (known: {', '.join(BLOCK_CLASSES)}); run it at "
                            f"block level (branches ['block'])")


def _inner(model):
    return getattr(model, "original_model", model)


def is_two_stream(model) -> bool:
    return type(_inner(model)).__name__ in MODEL_CLASSES


def branch_names(model) -> list[str]:
    """The model's branches: the union of its blocks' units, in :data:`BRANCH_ORDER`."""
    have = {b for ref in find_blocks(_inner(model)) for b in block_branches(ref.module)}
    return [b for b in BRANCH_ORDER if b in have]


def applicable(model) -> list[list[bool]]:
    """``[block][branch]`` -> whether the block has that unit (False: not applicable, always computed)."""
    names = branch_names(model)
    return [[b in block_branches(ref.module) for b in names] for ref in find_blocks(_inner(model))]


def _linear_macs(module: torch.nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))


def _attention_macs(attn, q_tokens: int, kv_tokens: int) -> int:
    """QK^T and PV: 2 x q_tokens x kv_tokens x inner_dim."""
    return 2 * q_tokens * kv_tokens * attn.to_q.out_features


def estimate_branch_flops(model, image_tokens: int | None = None, text_tokens: int | None = None) -> list[list[float]]:
    """FLOPs (2 x multiply-accumulates of linear layers and attention) of every unit of every block for one
    sample with ``image_tokens`` image and ``text_tokens`` text tokens; 0 where a unit does not apply. (In
    SD3's last block the text stream's modulation feeds only the attention: it counts as ``attn1``'s.)

    Defaults: SD3 -- the config's ``sample_size / patch_size`` squared image tokens and 333 text tokens;
    Flux -- 4096 image tokens (1024 x 1024) and 512 text tokens. The adaLN modulation and the norms
    (always computed) are not in it. :func:`l2c_kernels.runtime.branch_wrappers.measure_branch_flops`
    counts a real call instead."""
    inner = _inner(model)
    cls = type(inner).__name__
    if image_tokens is None:
        if cls == "SD3Transformer2DModel":
            image_tokens = (inner.config.sample_size // inner.config.patch_size) ** 2
        else:
            image_tokens = 4096
    if text_tokens is None:
        text_tokens = DEFAULT_TEXT_TOKENS.get(cls, 512)
    ti, tt = int(image_tokens), int(text_tokens)
    names = branch_names(inner)
    out = []
    for ref in find_blocks(inner):
        blk, kind = ref.module, type(ref.module).__name__
        have = block_branches(blk)
        macs = dict.fromkeys(names, 0)
        if kind == "FluxSingleTransformerBlock":
            t = ti + tt
            dim = blk.proj_out.out_features
            w_per_token = blk.proj_out.out_features  # each input column of proj_out costs out_features MACs per token
            macs["attn1"] = t * _linear_macs(blk.attn) + _attention_macs(blk.attn, t, t) + t * dim * w_per_token
            macs["ff"] = t * _linear_macs(blk.proj_mlp) + t * blk.mlp_hidden_dim * w_per_token
        else:
            a = blk.attn
            img = sum(_linear_macs(m) for m in (a.to_q, a.to_k, a.to_v, a.to_out))
            txt = sum(_linear_macs(m) for m in (a.add_q_proj, a.add_k_proj, a.add_v_proj))
            if getattr(a, "to_add_out", None) is not None:
                txt += _linear_macs(a.to_add_out)
            macs["attn1"] = ti * img + tt * txt + _attention_macs(a, ti + tt, ti + tt)
            if getattr(blk, "context_pre_only", False):
                macs["attn1"] += _linear_macs(blk.norm1_context)  # its modulation feeds only the attention
            if "attn2" in have:
                macs["attn2"] = ti * _linear_macs(blk.attn2) + _attention_macs(blk.attn2, ti, ti)
            macs["ff"] = ti * _linear_macs(blk.ff)
            if "ff_context" in have:
                macs["ff_context"] = tt * _linear_macs(blk.ff_context)
        out.append([float(2 * macs[b]) if b in have else 0.0 for b in names])
    return out


class TwoStreamBranchAdapter(BlockAdapter):
    """Schedule facts of SD3 / Flux at branch level (the units above). Running is
    :mod:`l2c_kernels.runtime.branch_wrappers`' job: the forward-in-pieces entry points refuse."""

    model_classes = MODEL_CLASSES
    level = TWO_STREAM_LEVEL

    def matches(self, model) -> bool:
        return type(model).__name__ in MODEL_CLASSES

    def blocks(self, model):
        pattern_for(model)
        return [ref.module for ref in find_blocks(model)]

    def branches(self, model) -> list[str]:
        return branch_names(model)

    def applicable(self, model) -> list[list[bool]]:
        return applicable(model)

    def unit_branch_flops(self, model) -> list[list[float]]:
        return estimate_branch_flops(model)

    def branch_flops(self, model, tokens=None, text_tokens: int = 8) -> dict:
        """Mean FLOPs of each branch over the blocks that have it (``unit_branch_flops`` has each block's)."""
        names, costs, app = branch_names(model), estimate_branch_flops(model), applicable(model)
        out = {}
        for i, b in enumerate(names):
            vals = [row[i] for row, ok in zip(costs, app) if ok[i]]
            out[b] = sum(vals) / max(1, len(vals))
        return out

    def _refuse(self, *_):
        raise TypeError("SD3 / Flux branch-level schedules run through compile_schedule (block wrappers that "
                        "compute or reuse each unit), not through the adapter's forward pieces")

    prepare = block_context = compute_branch = branch_gate = finish = _refuse
