"""PixArt blocks (``PixArtTransformer2DModel``: ``BasicTransformerBlock`` with ``ada_norm_single``).

One shared timestep embedding gives ``[B, 6C]``; each block adds its ``scale_shift_table``.
``h += gate_msa * attn1(modulate(norm1(h)))``; ``h += attn2(h, text)`` (no norm, no gate);
``h += gate_mlp * ff(modulate(norm2(h)))``.
"""
from __future__ import annotations


from .. import ops
from .base import BlockAdapter, StepContext, StepInputs


class AdaNormSingleAdapter(BlockAdapter):
    model_classes = ("PixArtTransformer2DModel",)

    def branches(self, model) -> list[str]:
        has_cross = model.transformer_blocks[0].attn2 is not None
        return ["attn1", "attn2", "ff"] if has_cross else ["attn1", "ff"]

    def branch_flops(self, model, tokens=None, text_tokens=8) -> dict:
        cfg = model.config
        if tokens is None:
            tokens = (cfg.sample_size // cfg.patch_size) ** 2
        dim = cfg.num_attention_heads * cfg.attention_head_dim
        blk = model.transformer_blocks[0]
        out = {"attn1": self.attention_macs(tokens, dim), "ff": self.ff_macs(tokens, blk.ff)}
        if blk.attn2 is not None:
            # text tokens are projected to the model width by caption_projection before the blocks
            out["attn2"] = self.attention_macs(tokens, dim, kv_tokens=text_tokens, kv_dim=dim)
        return {b: out[b] for b in self.branches(model)}

    def prepare(self, model, inputs: StepInputs):
        a = inputs.args
        x = a["hidden_states"]
        if model.use_additional_conditions and a.get("added_cond_kwargs") is None:
            raise ValueError("`added_cond_kwargs` cannot be None when using additional conditions for `adaln_single`.")
        attention_mask = a.get("attention_mask")
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = ((1 - attention_mask.to(x.dtype)) * -10000.0).unsqueeze(1)
        enc_mask = a.get("encoder_attention_mask")
        if enc_mask is not None and enc_mask.ndim == 2:
            enc_mask = ((1 - enc_mask.to(x.dtype)) * -10000.0).unsqueeze(1)
        batch = x.shape[0]
        height, width = x.shape[-2] // model.config.patch_size, x.shape[-1] // model.config.patch_size
        h = model.pos_embed(x)
        t_emb, embedded_t = model.adaln_single(a.get("timestep"), a.get("added_cond_kwargs"),
                                               batch_size=batch, hidden_dtype=h.dtype)
        enc = a.get("encoder_hidden_states")
        if model.caption_projection is not None:
            enc = model.caption_projection(enc).view(batch, -1, h.shape[-1])
        ctx = StepContext(batch=batch)
        ctx.values.update(height=height, width=width, t_emb=t_emb, embedded_t=embedded_t,
                          encoder_hidden_states=enc, encoder_attention_mask=enc_mask,
                          attention_mask=attention_mask,
                          cross_attention_kwargs=a.get("cross_attention_kwargs") or {})
        return h, ctx

    def block_context(self, block, ctx: StepContext) -> dict:
        t = ctx.values["t_emb"]
        # [6, B, C] in one contiguous copy: the six vectors reach the fused ops without per-op copies
        mods = (block.scale_shift_table[None] + t.reshape(t.shape[0], 6, -1)).transpose(0, 1).contiguous()
        names = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")
        return dict(zip(names, mods.unbind(0)))

    def compute_branch(self, block, name, h, bctx, ctx):
        v = ctx.values
        kw = v["cross_attention_kwargs"]
        if name == "attn1":
            n = ops.adaln_modulate(h, bctx["shift_msa"], bctx["scale_msa"], block.norm1.eps)
            return block.attn1(n, encoder_hidden_states=None, attention_mask=v["attention_mask"], **kw)
        if name == "attn2":
            return block.attn2(h, encoder_hidden_states=v["encoder_hidden_states"],
                               attention_mask=v["encoder_attention_mask"], **kw)
        assert name == "ff", f"unknown branch {name!r}"
        n = ops.adaln_modulate(h, bctx["shift_mlp"], bctx["scale_mlp"], block.norm2.eps)
        return block.ff(n)

    def branch_gate(self, name, bctx):
        return {"attn1": bctx["gate_msa"], "ff": bctx["gate_mlp"]}.get(name)

    def finish(self, model, h, ctx, inputs):
        v = ctx.values
        shift, scale = (model.scale_shift_table[None] + v["embedded_t"][:, None].to(h.device)).chunk(2, dim=1)
        h = ops.adaln_modulate(h, shift.squeeze(1), scale.squeeze(1), model.norm_out.eps)
        h = model.proj_out(h)
        return self.unpatchify(h, v["height"], v["width"], model.config.patch_size, model.out_channels)
