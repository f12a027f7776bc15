"""DiT blocks (``DiTTransformer2DModel``: ``BasicTransformerBlock`` with ``ada_norm_zero``).

Per block: ``emb = linear(silu(emb(t, class)))`` gives shift/scale/gate for attention and MLP;
``h += gate_msa * attn1(modulate(norm1(h)))``, ``h += gate_mlp * ff(modulate(norm3(h)))``.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from .. import ops
from ..ops.capture import capturing
from .base import BlockAdapter, StepContext, StepInputs


class AdaNormZeroAdapter(BlockAdapter):
    model_classes = ("DiTTransformer2DModel",)

    def branches(self, model) -> list[str]:
        return ["attn1", "ff"]

    def branch_flops(self, model, tokens=None, text_tokens=8) -> dict:
        cfg = model.config
        if tokens is None:
            tokens = (cfg.sample_size // cfg.patch_size) ** 2
        dim = cfg.num_attention_heads * cfg.attention_head_dim
        blk = model.transformer_blocks[0]
        return {"attn1": self.attention_macs(tokens, dim), "ff": self.ff_macs(tokens, blk.ff)}

    def prepare(self, model, inputs: StepInputs):
        a = inputs.args
        x = a["hidden_states"]
        ctx = StepContext(batch=x.shape[0])
        ctx.values.update(
            height=x.shape[-2] // model.patch_size, width=x.shape[-1] // model.patch_size,
            timestep=a.get("timestep"), class_labels=a.get("class_labels"),
            cross_attention_kwargs=a.get("cross_attention_kwargs") or {})
        h = model.pos_embed(x)
        ctx.values["dtype"] = h.dtype
        ctx.values["temb"] = _timestep_embeddings(model, ctx.values["timestep"], h.dtype)
        return h, ctx

    def traced_context(self, block, ctx: StepContext) -> StepContext:
        # the block's cached timestep embedding as a tensor input of the compiled work, not a lookup by block
        temb = ctx.values.get("temb")
        if temb is None:
            return ctx
        return StepContext(batch=ctx.batch, values=dict(ctx.values, temb=None, temb_block=temb[id(block)]))

    @staticmethod
    def _embedding(block, ctx: StepContext) -> torch.Tensor:
        """``block.norm1.emb(timestep, class_labels)``, with the timestep half from the per-value cache."""
        emb, v = block.norm1.emb, ctx.values
        temb = v.get("temb_block")
        if temb is None and v.get("temb") is not None:
            temb = v["temb"][id(block)]
        if temb is not None:  # the timestep half of the block's embedding, computed once per timestep value
            return temb + emb.class_embedder(v["class_labels"])
        return emb(v["timestep"], v["class_labels"], hidden_dtype=v["dtype"])

    def _conditioning(self, block, ctx: StepContext) -> torch.Tensor:
        return block.norm1.silu(self._embedding(block, ctx))

    def block_gates(self, block, ctx: StepContext) -> dict:
        # rows [2C, 3C) and [5C, 6C) of the adaLN projection: a third of its work
        lin = block.norm1.linear
        c = lin.out_features // 6
        s = self._conditioning(block, ctx)
        w, b = lin.weight, lin.bias
        return dict(gate_msa=F.linear(s, w[2 * c:3 * c], None if b is None else b[2 * c:3 * c]),
                    gate_mlp=F.linear(s, w[5 * c:], None if b is None else b[5 * c:]))

    def block_context(self, block, ctx: StepContext) -> dict:
        n1 = block.norm1
        emb = n1.linear(self._conditioning(block, ctx))
        # one copy makes all six [B, C] vectors contiguous (the fused ops would copy each strided chunk)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            emb.view(emb.shape[0], 6, -1).transpose(0, 1).contiguous().unbind(0))
        return dict(shift_msa=shift_msa, scale_msa=scale_msa, gate_msa=gate_msa,
                    shift_mlp=shift_mlp, scale_mlp=scale_mlp, gate_mlp=gate_mlp)

    def compute_branch(self, block, name, h, bctx, ctx):
        kw = ctx.values["cross_attention_kwargs"]
        if name == "attn1":
            n = ops.adaln_modulate(h, bctx["shift_msa"], bctx["scale_msa"], block.norm1.norm.eps)
            return block.attn1(n, encoder_hidden_states=None, attention_mask=None, **kw)
        assert name == "ff", f"unknown branch {name!r}"
        n = ops.adaln_modulate(h, bctx["shift_mlp"], bctx["scale_mlp"], block.norm3.eps)
        return block.ff(n)

    def branch_gate(self, name, bctx):
        return bctx["gate_msa"] if name == "attn1" else bctx["gate_mlp"]

    def finish(self, model, h, ctx, inputs):
        cond = self._embedding(model.transformer_blocks[0], ctx)
        shift, scale = model.proj_out_1(F.silu(cond)).chunk(2, dim=1)
        h = ops.adaln_modulate(h, shift, scale, model.norm_out.eps)
        h = model.proj_out_2(h)
        side = int(h.shape[1] ** 0.5)
        return self.unpatchify(h, side, side, model.patch_size, model.out_channels)


# model -> {(timestep value, dtype, weight versions): {id(block): [1, C] timestep embedding}}
_TEMB_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_TEMB_CACHE_SIZE = 256  # distinct timesteps kept per model (a few samplers' worth)


def _timestep_embeddings(model, timestep, dtype) -> dict | None:
    """Every block's ``timestep_embedder(time_proj(t))`` for the call's timestep, cached by its value.

    A DiT block embeds the timestep with its own two linears (and the sinusoidal projection) on every
    call, ~12 small ops per block that depend on nothing but ``t``; a sampler passes the same few
    timesteps to every generation. Used in CPU inference (reading ``t`` on the host is free there), eager or
    compiled (the compiled block work takes its block's entry as an input: ``traced_context``); never on GPU
    (the CUDA graph replays the embedding), inside a graph capture (emulated ones included: a graph would freeze
    the capture's lookup), inside a traced function, with autograd recording, or when the
    batch mixes timesteps. In-place weight updates invalidate the
    entry (parameter version counters are part of the key)."""
    if (not isinstance(timestep, torch.Tensor) or timestep.device.type != "cpu" or torch.is_grad_enabled()
            or torch.compiler.is_compiling() or timestep.numel() == 0 or capturing()):
        return None
    t = timestep.reshape(-1)
    if t.numel() > 1 and not bool((t == t[0]).all()):
        return None
    blocks = list(model.transformer_blocks)
    embs = [blk.norm1.emb for blk in blocks]
    versions = tuple(p._version for e in embs for p in e.timestep_embedder.parameters())
    key = (float(t[0]), dtype, versions)
    per_model = _TEMB_CACHE.get(model)
    if per_model is None:
        per_model = _TEMB_CACHE[model] = {}
    hit = per_model.get(key)
    if hit is None:
        if len(per_model) >= _TEMB_CACHE_SIZE:
            per_model.clear()
        one = t[:1]
        hit = {id(blk): e.timestep_embedder(e.time_proj(one).to(dtype=dtype)) for blk, e in zip(blocks, embs)}
        per_model[key] = hit
    return hit
