"""DiT blocks (``DiTTransformer2DModel``: ``BasicTransformerBlock`` with ``ada_norm_zero``).

Per block: ``emb = linear(silu(emb(t, class)))`` gives shift/scale/gate for attention and MLP;
``h += gate_msa * attn1(modulate(norm1(h)))``, ``h += gate_mlp * ff(modulate(norm3(h)))``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
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
        return h, ctx

    def block_context(self, block, ctx: StepContext) -> dict:
        n1 = block.norm1
        emb = n1.emb(ctx.values["timestep"], ctx.values["class_labels"], hidden_dtype=ctx.values["dtype"])
        emb = n1.linear(n1.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
        return dict(shift_msa=shift_msa, scale_msa=scale_msa, gate_msa=gate_msa,
                    shift_mlp=shift_mlp, scale_mlp=scale_mlp, gate_mlp=gate_mlp)

    def compute_branch(self, block, name, h, bctx, ctx):
        kw = ctx.values["cross_attention_kwargs"]
        if name == "attn1":
            n = ops.adaln_modulate(h, bctx["shift_msa"], bctx["scale_msa"], block.norm1.norm.eps)
            return block.attn1(n, encoder_hidden_states=None, attention_mask=None, **kw)
        if name == "ff":
            n = ops.adaln_modulate(h, bctx["shift_mlp"], bctx["scale_mlp"], block.norm3.eps)
            return block.ff(n)
        raise KeyError(name)

    def branch_gate(self, name, bctx):
        return bctx["gate_msa"] if name == "attn1" else bctx["gate_mlp"]

    def finish(self, model, h, ctx, inputs):
        v = ctx.values
        cond = model.transformer_blocks[0].norm1.emb(v["timestep"], v["class_labels"], hidden_dtype=h.dtype)
        shift, scale = model.proj_out_1(F.silu(cond)).chunk(2, dim=1)
        h = ops.adaln_modulate(h, shift, scale, model.norm_out.eps)
        h = model.proj_out_2(h)
        side = int(h.shape[1] ** 0.5)
        return self.unpatchify(h, side, side, model.patch_size, model.out_channels)
