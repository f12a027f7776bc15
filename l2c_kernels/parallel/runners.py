"""Running one component (a contiguous run of blocks) of a transformer call.

``ModelRunner`` drives a plain diffusers model through its *own* forward: blocks outside the
component are passed through, the component's first block receives the given residual stream,
and the forward stops after the component's last block (or runs to the end, through the final
layer, for the last component). The computation is therefore exactly the model's own, and a
full call is the original forward bit for bit.

``CachedRunner`` drives a :class:`~l2c_kernels.runtime.CachedTransformer` with its pieces
(``begin_step`` / ``run_blocks`` / ``end_step``), so each component follows the cache schedule.
"""
from __future__ import annotations

import torch

from ..adapters import StepInputs, adapter_for


class _Stop(Exception):
    def __init__(self, h):
        super().__init__()
        self.h = h


def _passthrough(hidden_states, *args, **kwargs):
    return hidden_states


class ModelRunner:
    """Components of a plain diffusers transformer, run through the model's own forward."""

    stateful = False

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.adapter = adapter_for(model)
        self.blocks = self.adapter.blocks(model)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def _forward(self, args: dict) -> torch.Tensor:
        out = self.model(**args, return_dict=False)
        return out[0] if isinstance(out, (tuple, list)) else out

    def full(self, args: dict, capture: list[int], step: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The whole model (its original forward); ``captured[b]`` is the residual stream after block b."""
        captured: dict[int, torch.Tensor] = {}
        hooks = [self.blocks[b].register_forward_hook(lambda _m, _i, o, b=b: captured.__setitem__(b, _tensor(o)))
                 for b in capture]
        try:
            return self._forward(args), captured
        finally:
            for h in hooks:
                h.remove()

    def component(self, args: dict, start: int, end: int, h_in: torch.Tensor | None, step: int) -> torch.Tensor:
        """Blocks ``start..end-1`` on ``h_in`` (on the call's own embedded input when None, which needs
        ``start == 0``). Returns the residual stream after block ``end-1``, or the model output when
        ``end`` is the last block."""
        if h_in is None and start != 0:
            raise ValueError("a component that does not start at block 0 needs its input residual stream")
        final = end == len(self.blocks)
        patched, hooks = [], []
        try:
            for b, blk in enumerate(self.blocks):
                if not start <= b < end:
                    patched.append((blk, blk.__dict__.get("forward")))
                    blk.forward = _passthrough
            if h_in is not None:
                def feed(_m, a, kw):
                    if a:
                        return (h_in,) + tuple(a[1:]), kw
                    kw = dict(kw)
                    kw["hidden_states"] = h_in
                    return a, kw

                hooks.append(self.blocks[start].register_forward_pre_hook(feed, with_kwargs=True))
            if not final:
                def stop(_m, _i, o):
                    raise _Stop(_tensor(o))

                hooks.append(self.blocks[end - 1].register_forward_hook(stop))
            try:
                return self._forward(args)
            except _Stop as s:
                return s.h
        finally:
            for h in hooks:
                h.remove()
            for blk, fwd in patched:
                if fwd is None:
                    del blk.forward
                else:
                    blk.forward = fwd

    def reset(self) -> None:
        pass


class CachedRunner:
    """Components of a ``CachedTransformer``: each runs its blocks with the step's cache plan."""

    stateful = True  # the cache buffers belong to the runner

    def __init__(self, cached):
        self.cached = cached
        self.model = cached.original_model
        self.adapter = cached.adapter
        self.blocks = self.adapter.blocks(self.model)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def _begin(self, args: dict, step: int):
        s, caches = self.cached.begin_step(args, step=step)
        h, ctx = self.adapter.prepare(self.model, StepInputs(args=args))
        return s, caches, h.contiguous(), ctx

    def full(self, args: dict, capture: list[int], step: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        s, caches, h, ctx = self._begin(args, step)
        captured, prev = {}, 0
        with torch.no_grad():
            for b in sorted(set(capture)):
                h = self.cached.run_blocks(s, h, ctx, caches, prev, b + 1)
                captured[b] = h.clone()
                prev = b + 1
            h = self.cached.run_blocks(s, h, ctx, caches, prev, len(self.blocks))
            out = self.adapter.finish(self.model, h, ctx, StepInputs(args=args))
        self.cached.end_step(s)
        return out, captured

    def component(self, args: dict, start: int, end: int, h_in: torch.Tensor | None, step: int) -> torch.Tensor:
        if h_in is None and start != 0:
            raise ValueError("a component that does not start at block 0 needs its input residual stream")
        s, caches, h, ctx = self._begin(args, step)
        with torch.no_grad():
            if h_in is not None:
                h = h_in.clone(memory_format=torch.contiguous_format)
            h = self.cached.run_blocks(s, h, ctx, caches, start, end)
            if end == len(self.blocks):
                h = self.adapter.finish(self.model, h, ctx, StepInputs(args=args))
        self.cached.end_step(s)
        return h

    def reset(self) -> None:
        self.cached.reset()


def _tensor(o):
    if isinstance(o, torch.Tensor):
        return o
    raise TypeError(f"blocks returning {type(o).__name__} (not a tensor) are not supported")


def is_cached(model) -> bool:
    from ..runtime.cached_transformer import CachedTransformer

    return isinstance(model, CachedTransformer)


def runner_for(model):
    return CachedRunner(model) if is_cached(model) else ModelRunner(model)
