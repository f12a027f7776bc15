"""Running one component (a contiguous run of blocks) of a transformer call.

The state between components is the tuple of token streams entering the next component's first
block (:mod:`.streams`): ``(hidden_states,)`` for DiT / PixArt, ``(encoder_hidden_states,
hidden_states)`` for SD3 and Flux.

``ModelRunner`` drives a plain diffusers model through its *own* forward: blocks outside the
component return their streams unchanged, the component's first block receives the given state,
and the forward stops in front of the next component's first block (or runs to the end, through
the final layer, for the last component). Whatever the forward does between blocks is done as in
the model. The computation is therefore exactly the model's own, and a full call is the original
forward bit for bit.

``CachedRunner`` drives a :class:`~l2c_kernels.runtime.CachedTransformer` with its pieces
(``begin_step`` / ``run_blocks`` / ``end_step``), so each component follows the cache schedule.
``BlockCachedRunner`` drives the block-level module (and SD3 / Flux at branch level) as ``ModelRunner``
drives a model: the family's forward on the module's shadow, the stand-ins of blocks outside the
component passing their streams through, those inside following the step's plan on this runner's caches.
"""
from __future__ import annotations

import contextlib

import torch

from ..adapters import StepInputs
from .streams import BlockStreams, UnsplittableModelError


class _Stop(Exception):
    def __init__(self, state):
        super().__init__()
        self.state = state


class ModelRunner:
    """Components of a plain diffusers transformer, run through the model's own forward."""

    stateful = False

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.streams = BlockStreams(model)
        self.blocks = self.streams.blocks

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def _forward(self, args: dict, keep: range | None = None, step: int = 0) -> torch.Tensor:
        """The model's forward on ``args``, the blocks outside ``keep`` (None: none) returning their streams."""
        with self.streams.bypassed(keep) if keep is not None else contextlib.nullcontext():
            out = self.model(**args, return_dict=False)
        return out[0] if isinstance(out, (tuple, list)) else out

    def full(self, args: dict, capture: list[int], step: int) -> tuple[torch.Tensor, dict[int, tuple]]:
        """The whole model (its original forward); ``captured[b]`` is the state entering block b (its streams)."""
        captured: dict[int, tuple] = {}
        st = self.streams

        def grab(b):
            def hook(_m, a, kw):
                captured[b] = tuple(x.clone() for x in st.read(b, a, kw))
            return hook

        hooks = [self.blocks[b].register_forward_pre_hook(grab(b), with_kwargs=True) for b in capture]
        try:
            out = self._forward(args, None, step)
        finally:
            for h in hooks:
                h.remove()
        missing = [st.labels[b] for b in capture if b not in captured]
        if missing:
            raise UnsplittableModelError(f"AsyncDenoiser cannot split {st.model_class} here: its forward did not "
                                         f"call {', '.join(missing)} (a component boundary) on this call")
        return out, captured

    def component(self, args: dict, start: int, end: int, state_in: tuple | None, step: int):
        """Blocks ``start..end-1`` on the state ``state_in`` entering block ``start`` (on the call's own embedded
        input when None, which needs ``start == 0``). Returns the state entering block ``end`` (a tuple of
        streams), or the model output when ``end`` is past the last block."""
        if state_in is None and start != 0:
            raise ValueError("a component that does not start at block 0 needs its input state")
        st = self.streams
        final = end == len(self.blocks)
        hooks, fed = [], []
        if state_in is not None:
            st.check_state(start, state_in)

            def feed(_m, a, kw):
                fed.append(True)
                return st.replace(start, a, kw, state_in)

            hooks.append(self.blocks[start].register_forward_pre_hook(feed, with_kwargs=True))
        if not final:
            def stop(_m, a, kw):
                raise _Stop(st.read(end, a, kw))

            hooks.append(self.blocks[end].register_forward_pre_hook(stop, with_kwargs=True))
        try:
            out = self._forward(args, range(start, end), step)
        except _Stop as s:
            out = s.state
        finally:
            for h in hooks:
                h.remove()
        if state_in is not None and not fed:
            raise UnsplittableModelError(f"AsyncDenoiser cannot split {st.model_class} here: its forward did not "
                                         f"call {st.labels[start]}, where a component starts")
        if not final and not isinstance(out, tuple):
            raise UnsplittableModelError(f"AsyncDenoiser cannot split {st.model_class} here: its forward did not "
                                         f"call {st.labels[end]}, where the next component starts")
        return out

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

    def full(self, args: dict, capture: list[int], step: int) -> tuple[torch.Tensor, dict[int, tuple]]:
        s, caches, h, ctx = self._begin(args, step)
        captured, prev = {}, 0
        with torch.no_grad():
            for b in sorted(set(capture)):  # the residual stream entering block b
                h = self.cached.run_blocks(s, h, ctx, caches, prev, b)
                captured[b] = (h.clone(),)
                prev = b
            h = self.cached.run_blocks(s, h, ctx, caches, prev, len(self.blocks))
            out = self.adapter.finish(self.model, h, ctx, StepInputs(args=args))
        self.cached.end_step(s)
        return out, captured

    def component(self, args: dict, start: int, end: int, state_in: tuple | None, step: int):
        if state_in is None and start != 0:
            raise ValueError("a component that does not start at block 0 needs its input state")
        s, caches, h, ctx = self._begin(args, step)
        with torch.no_grad():
            if state_in is not None:
                (h_in,) = state_in
                h = h_in.clone(memory_format=torch.contiguous_format)
            h = self.cached.run_blocks(s, h, ctx, caches, start, end)
            if end == len(self.blocks):
                h = self.adapter.finish(self.model, h, ctx, StepInputs(args=args))
            else:
                h = (h,)
        self.cached.end_step(s)
        return h

    def reset(self) -> None:
        self.cached.reset()


class BlockCachedRunner(ModelRunner):
    """Components of a block-level module (``BlockCachedTransformer``; ``BranchCachedTransformer`` for SD3 / Flux
    units): its shadow's forward, run eagerly (no CUDA graph: a component is part of a step), the blocks outside the
    component passing through (nothing computed, stored or read there), each step one call of the module's step
    bookkeeping on its first pass's caches."""

    stateful = True  # the cache buffers belong to the runner

    def __init__(self, cached):
        self.cached, self.model = cached, cached._shadow
        self.streams = BlockStreams(cached.original_model)  # the blocks' stream names, read from the pattern table
        stand_ins = {w._ref.index: w for name in cached.pattern.block_lists for w in self.model._modules[name]}
        self.blocks = [stand_ins[b] for b in range(len(stand_ins))]  # hooks go on the stand-ins: a reused block
        # never calls its diffusers block

    def _forward(self, args: dict, keep: range | None = None, step: int = 0) -> torch.Tensor:
        c = self.cached
        kw = dict(args, return_dict=False)
        c.set_step(step)
        s, p = c._resolve((), kw)
        caches = c._caches_for(p, None)
        if s == 0:
            caches.clear()
        c._state.keep = keep
        try:
            out = c._run_step(s, caches, (), kw)
        except _Stop:
            c._end(s, p, caches)   # stopped in front of the next component: this one's part of step s ran
            raise
        finally:
            c._state.keep = None
        c._end(s, p, caches)
        return out[0] if isinstance(out, (tuple, list)) else out

    def reset(self) -> None:
        self.cached.reset()


def is_cached(model) -> bool:
    """A module of ``compile_schedule`` (any level)."""
    from ..runtime.drop_in import DropInModule

    return isinstance(model, DropInModule)


def runner_for(model):
    from ..runtime.cached_transformer import CachedTransformer

    if isinstance(model, CachedTransformer):
        return CachedRunner(model)
    return BlockCachedRunner(model) if is_cached(model) else ModelRunner(model)
