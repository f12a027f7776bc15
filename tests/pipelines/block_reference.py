"""An independent reference of block-residual reuse: forward hooks on the original model's blocks.

Written from the diffusers forwards, without the library's pattern table or runtime: for each family
the block lists (forward order) and the streams each block returns (in return order). At a step
where the mask reuses block ``b``, the hook replaces the block's output by ``in + (out - in)`` of the
last step that computed it, per stream and per pass (a pipeline that calls the transformer twice per
step, Wan with CFG, has a cache per call of the step). The block is still computed there (wasted
work, but nothing of it reaches the output). With ``forecast="linear"`` / ``"quadratic"`` the reused
residual is the Lagrange extrapolation, in step indices, through the last two / three computed
residuals (lower order while fewer exist), as ``Schedule.forecast`` defines it.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch

# model class -> (block lists in forward order, streams each block returns in its return order)
FAMILIES = {
    "SD3Transformer2DModel": (["transformer_blocks"], ("encoder_hidden_states", "hidden_states")),
    "FluxTransformer2DModel": (["transformer_blocks", "single_transformer_blocks"],
                               ("encoder_hidden_states", "hidden_states")),
    "WanTransformer3DModel": (["blocks"], ("hidden_states",)),
}


def blocks_of(model) -> list:
    lists, _ = FAMILIES[type(model).__name__]
    return [blk for name in lists for blk in getattr(model, name)]


@contextmanager
def hook_reuse(model, mask, passes: int = 1, forecast: str = "none"):
    """Run ``model`` as if ``mask[step][block]`` (True = compute) were applied by block-residual reuse.

    Steps are counted from the calls: call ``c`` of a generation is step ``c // passes``, pass
    ``c % passes``; a generation has ``len(mask) * passes`` calls."""
    _, streams = FAMILIES[type(model).__name__]
    calls = [-1]
    cache: dict = {}
    handles = []

    def on_call(module, args, kwargs):
        calls[0] = (calls[0] + 1) % (len(mask) * passes)

    def on_block(b, module, args, kwargs, output):
        step, p = divmod(calls[0], passes)
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        ins = [bound.get(n) for n in streams]
        outs = [output] if len(streams) == 1 else list(output)
        if mask[step][b]:
            for k, (x, o) in enumerate(zip(ins, outs)):
                hist = cache.setdefault((p, b, k), [])
                if step == 0:   # a new generation
                    hist.clear()
                hist.append((step, None if o is None else (o - x).double()))
            return None
        new = [None if cache[(p, b, k)][-1][1] is None
               else x + extrapolate(cache[(p, b, k)], step, forecast).to(x.dtype) for k, x in enumerate(ins)]
        return new[0] if len(streams) == 1 else tuple(new)

    handles.append(model.register_forward_pre_hook(on_call, with_kwargs=True))
    for b, blk in enumerate(blocks_of(model)):
        handles.append(blk.register_forward_hook(lambda m, a, kw, out, b=b: on_block(b, m, a, kw, out),
                                                 with_kwargs=True))
    try:
        with torch.no_grad():
            yield
    finally:
        for h in handles:
            h.remove()


def extrapolate(history, step: int, forecast: str) -> torch.Tensor:
    """The residual at ``step`` from ``history`` = [(computed step, residual), ...] (float64)."""
    order = {"none": 0, "linear": 1, "quadratic": 2}[forecast]
    pts = history[-(order + 1):]
    out = torch.zeros_like(pts[-1][1])
    for i, (si, yi) in enumerate(pts):   # Lagrange basis through the last order + 1 computations
        li = 1.0
        for j, (sj, _) in enumerate(pts):
            if j != i:
                li *= (step - sj) / (si - sj)
        out = out + li * yi
    return out
