"""Block I/O patterns of diffusers transformer families, for caching at block granularity.

A family's forward runs one or more lists of blocks (Flux: ``transformer_blocks``, then
``single_transformer_blocks``). Each block takes the token streams -- ``hidden_states`` and, for
joint-attention blocks, ``encoder_hidden_states`` -- and returns them updated, in an order that
depends on the block class: Flux returns ``(encoder, hidden)``, HunyuanVideo ``(hidden, encoder)``,
Wan only ``hidden``. A block-level schedule reuses a block by re-adding its cached residual
``out - in`` to each stream it returns.

This module is pure data plus the checks that need no call: :func:`pattern_for` finds a family's
entry and its block lists (refusing, with the reason, a model whose class, block list or block class
does not fit). The runtime (:mod:`l2c_kernels.runtime.block_runtime`) checks the rest on the first
real call: that the named streams are tensors, that the block returns what the pattern says, in
that order, with each stream's shape unchanged, and that the forward runs every block once, in order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

HIDDEN, ENCODER = "hidden_states", "encoder_hidden_states"


@dataclass(frozen=True)
class BlockPattern:
    """How a block class is called and what it returns.

    ``returns``: the stream arguments the block returns, in its return order (one name: it returns
    that tensor alone). Every returned stream must also be an argument of the same shape; an argument
    the block receives but does not return (e.g. Wan's text tokens) is a condition, not a stream.
    """

    returns: tuple[str, ...]

    @property
    def single_output(self) -> bool:
        return len(self.returns) == 1

    def passed_through(self, bound: dict):
        """What the block returns when it leaves its streams unchanged: the stream arguments of ``bound`` (the
        block's bound call arguments) in its return order."""
        vals = tuple(bound.get(n) for n in self.returns)
        return vals[0] if self.single_output else vals


@dataclass(frozen=True)
class FamilyPattern:
    """A diffusers model class: its block lists in forward order and how its timestep argument maps to the
    sampler's timestep."""

    model_class: str
    block_lists: tuple[str, ...]
    blocks: dict                                  # block class name -> BlockPattern
    joint_attention: bool                         # text and image tokens attend jointly (no cross-attention)
    timestep_arg: str = "timestep"
    timestep_map: str = "same"                    # how the transformer's timestep maps to the sampler's
    note: str = ""

    def sampler_timestep(self, model, value: float) -> float:
        """The sampler timestep for the value the pipeline passes to the transformer (to 7 significant digits:
        the pipelines divide in float32, e.g. Flux's 555 / 1000 comes back as 555.0000071)."""
        return float(f"{TIMESTEP_MAPS[self.timestep_map](model, value):.7g}")


TIMESTEP_MAPS: dict[str, Callable] = {
    "same": lambda model, t: t,
    "per_mille": lambda model, t: t * 1000.0,                       # pipelines pass t / 1000 (Flux, Qwen, ...)
    "one_minus_per_mille": lambda model, t: (1.0 - t) * 1000.0,     # Lumina2 passes 1 - t / 1000
    "sana_scale": lambda model, t: t / float(getattr(model.config, "timestep_scale", 1.0) or 1.0),
}

ENC_HID = BlockPattern((ENCODER, HIDDEN))
HID_ENC = BlockPattern((HIDDEN, ENCODER))
HID = BlockPattern((HIDDEN,))


def _family(model_class, lists, blocks, joint, **kw) -> FamilyPattern:
    return FamilyPattern(model_class, tuple(lists), dict(blocks), joint, **kw)


# model class -> pattern. Block return orders are read from diffusers 0.42's forwards; each is checked on
# the first call, so a diffusers version that changes one is refused rather than run wrongly.
PATTERNS: dict[str, FamilyPattern] = {p.model_class: p for p in [
    _family("FluxTransformer2DModel", ["transformer_blocks", "single_transformer_blocks"],
            {"FluxTransformerBlock": ENC_HID, "FluxSingleTransformerBlock": ENC_HID}, True, timestep_map="per_mille"),
    _family("Flux2Transformer2DModel", ["transformer_blocks", "single_transformer_blocks"],
            {"Flux2TransformerBlock": ENC_HID, "Flux2SingleTransformerBlock": HID}, True, timestep_map="per_mille"),
    _family("ChromaTransformer2DModel", ["transformer_blocks", "single_transformer_blocks"],
            {"ChromaTransformerBlock": ENC_HID, "ChromaSingleTransformerBlock": HID}, True, timestep_map="per_mille"),
    _family("BriaTransformer2DModel", ["transformer_blocks", "single_transformer_blocks"],
            {"BriaTransformerBlock": ENC_HID, "BriaSingleTransformerBlock": ENC_HID}, True),
    _family("OvisImageTransformer2DModel", ["transformer_blocks", "single_transformer_blocks"],
            {"OvisImageTransformerBlock": ENC_HID, "OvisImageSingleTransformerBlock": ENC_HID}, True,
            timestep_map="per_mille"),
    _family("LongCatImageTransformer2DModel", ["transformer_blocks", "single_transformer_blocks"],
            {"LongCatImageTransformerBlock": ENC_HID, "LongCatImageSingleTransformerBlock": ENC_HID}, True,
            timestep_map="per_mille"),
    _family("SD3Transformer2DModel", ["transformer_blocks"], {"JointTransformerBlock": ENC_HID}, True,
            note="the last block of SD3 returns no text stream (context_pre_only): only its image stream is cached"),
    _family("QwenImageTransformer2DModel", ["transformer_blocks"], {"QwenImageTransformerBlock": ENC_HID}, True,
            timestep_map="per_mille"),
    _family("AuraFlowTransformer2DModel", ["joint_transformer_blocks", "single_transformer_blocks"],
            {"AuraFlowJointTransformerBlock": ENC_HID, "AuraFlowSingleTransformerBlock": HID}, True,
            timestep_map="per_mille"),
    _family("HunyuanVideoTransformer3DModel", ["transformer_blocks", "single_transformer_blocks"],
            {"HunyuanVideoTransformerBlock": HID_ENC, "HunyuanVideoSingleTransformerBlock": HID_ENC,
             "HunyuanVideoTokenReplaceTransformerBlock": HID_ENC,
             "HunyuanVideoTokenReplaceSingleTransformerBlock": HID_ENC}, True),
    _family("HunyuanImageTransformer2DModel", ["transformer_blocks", "single_transformer_blocks"],
            {"HunyuanImageTransformerBlock": HID_ENC, "HunyuanImageSingleTransformerBlock": HID_ENC}, True),
    _family("HunyuanVideo15Transformer3DModel", ["transformer_blocks"], {"HunyuanVideo15TransformerBlock": HID_ENC},
            True),
    _family("CogVideoXTransformer3DModel", ["transformer_blocks"], {"CogVideoXBlock": HID_ENC}, True),
    _family("CogView3PlusTransformer2DModel", ["transformer_blocks"], {"CogView3PlusTransformerBlock": HID_ENC}, True),
    _family("CogView4Transformer2DModel", ["transformer_blocks"], {"CogView4TransformerBlock": HID_ENC}, True),
    _family("MochiTransformer3DModel", ["transformer_blocks"], {"MochiTransformerBlock": HID_ENC}, True,
            note="the last block of Mochi returns no text stream (context_pre_only): only its video stream is cached"),
    _family("EasyAnimateTransformer3DModel", ["transformer_blocks"], {"EasyAnimateTransformerBlock": HID_ENC}, True),
    _family("WanTransformer3DModel", ["blocks"], {"WanTransformerBlock": HID}, False),
    _family("SkyReelsV2Transformer3DModel", ["blocks"], {"SkyReelsV2TransformerBlock": HID}, False),
    _family("LTXVideoTransformer3DModel", ["transformer_blocks"], {"LTXVideoTransformerBlock": HID}, False),
    _family("SanaTransformer2DModel", ["transformer_blocks"], {"SanaTransformerBlock": HID}, False,
            timestep_map="sana_scale"),
    _family("Lumina2Transformer2DModel", ["layers"], {"Lumina2TransformerBlock": HID}, True,
            timestep_map="one_minus_per_mille",
            note="the caption and noise refiner layers before the main layers always compute"),
    _family("AllegroTransformer3DModel", ["transformer_blocks"], {"AllegroTransformerBlock": HID}, False),
    _family("CosmosTransformer3DModel", ["transformer_blocks"], {"CosmosTransformerBlock": HID}, False),
    _family("DiTTransformer2DModel", ["transformer_blocks"], {"BasicTransformerBlock": HID}, False),
    _family("PixArtTransformer2DModel", ["transformer_blocks"], {"BasicTransformerBlock": HID}, False),
]}

# families that cannot run at block level, and why (the README's table lists them with these reasons)
REFUSED: dict[str, str] = {
    "HiDreamImageTransformer2DModel": "its double-stream blocks receive a different Llama layer's text tokens each "
                                      "(the text stream is not carried from block to block)",
    "Kandinsky5Transformer3DModel": "the visual blocks take the text blocks' final output, not a carried stream",
    "LTX2VideoTransformer3DModel": "blocks return video and audio streams with per-stream modulation arguments "
                                   "not covered by the pattern table yet",
    "HunyuanDiT2DModel": "long skip connections: later blocks take an earlier block's output as a second input, "
                         "which a replayed residual of hidden_states alone does not represent",
    "LatteTransformer3DModel": "spatial and temporal blocks from two lists alternate in the forward",
    "ZImageTransformer2DModel": "it takes lists of per-sample token sequences of different lengths, not batched tensors",
}


class BlockPatternError(TypeError):
    """A model whose blocks do not fit the block-level pattern; the message names what did not match."""


@dataclass(frozen=True)
class BlockRef:
    """One block of a model, in forward order."""

    index: int            # position among all the model's cached blocks, in forward order
    list_name: str        # the ModuleList it sits in
    list_index: int       # its position in that list
    module: torch.nn.Module
    pattern: BlockPattern


def _lookup(inner) -> FamilyPattern:
    name = type(inner).__name__
    if name in REFUSED:
        raise BlockPatternError(f"{name} is not supported at block level: {REFUSED[name]}")
    fam = PATTERNS.get(name)
    if fam is None:
        raise BlockPatternError(
            f"{name} is not supported: it has no branch adapter and is not in the block pattern table "
            f"(l2c_kernels.adapters.patterns.PATTERNS); supported transformers: {', '.join(sorted(PATTERNS))}")
    return fam


def pattern_for(model) -> FamilyPattern:
    """The pattern entry of ``model``'s class; raises :class:`BlockPatternError` naming the reason if none fits
    (class not in the table, a block list missing, a block of another class)."""
    inner = getattr(model, "original_model", model)
    fam = _lookup(inner)
    find_blocks(inner, fam)
    return fam


def find_blocks(model, fam: FamilyPattern | None = None) -> list[BlockRef]:
    """All cached blocks of ``model`` in forward order, each with its pattern (checked: lists and classes)."""
    inner = getattr(model, "original_model", model)
    fam = fam or _lookup(inner)
    refs: list[BlockRef] = []
    for list_name in fam.block_lists:
        blocks = inner._modules.get(list_name)
        if blocks is None:
            raise BlockPatternError(f"{fam.model_class} has no block list {list_name!r} (expected "
                                    f"{list(fam.block_lists)} in forward order)")
        if not isinstance(blocks, torch.nn.ModuleList):
            raise BlockPatternError(f"{fam.model_class}.{list_name} is a {type(blocks).__name__}, not a ModuleList")
        for i, blk in enumerate(blocks):
            cls = type(blk).__name__
            pat = fam.blocks.get(cls)
            if pat is None:
                raise BlockPatternError(f"{fam.model_class}.{list_name}[{i}] is a {cls}; the pattern table knows "
                                        f"{sorted(fam.blocks)} for this family")
            refs.append(BlockRef(len(refs), list_name, i, blk, pat))
    if not refs:
        raise BlockPatternError(f"{fam.model_class} has no blocks in {list(fam.block_lists)}")
    return refs


def estimate_block_flops(model) -> list[float]:
    """A per-block cost estimate without a call: 2 x the weights of the block's linear and convolution layers,
    divided by the number of streams it returns (a joint block holds one set of weights per stream, each used on
    that stream's tokens only), i.e. FLOPs per token. Attention's token-quadratic part and the real token counts
    are not in it; costs counted on a real call (:func:`l2c_kernels.runtime.block_flops.measure_block_flops`)
    give an exact budget."""
    out = []
    for ref in find_blocks(model):
        n = 0
        for m in ref.module.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
                n += m.weight.numel()
        out.append(float(2 * n / len(ref.pattern.returns)))
    return out
