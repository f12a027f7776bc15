"""The state passed between AsyncDiff components: the token streams entering a block.

A component boundary sits in front of a block. What crosses it is every *stream* that block takes and
returns, read from the block pattern table (:mod:`l2c_kernels.adapters.patterns`): ``hidden_states``
alone for DiT, PixArt or Wan; ``(encoder_hidden_states, hidden_states)`` for the joint-attention blocks
of SD3 and Flux (Flux's double and single blocks alike: its single blocks concatenate the two streams
inside). Everything else a block receives (``temb``, RoPE ``image_rotary_emb``, masks, the guidance
embedding folded into ``temb``) is recomputed from the call's own arguments by every process, as the
model's forward does.

Nothing here is specific to a family: a model is split if its class is in the pattern table (or has a
registered branch adapter, whose blocks carry ``hidden_states`` alone), and refused otherwise with
:class:`UnsplittableModelError` naming what did not match.
"""
from __future__ import annotations

import contextlib
import inspect

import torch

from ..adapters import adapter_for
from ..adapters.patterns import HIDDEN, PATTERNS, REFUSED, BlockPattern, BlockPatternError, find_blocks


class UnsplittableModelError(TypeError):
    """A transformer whose blocks AsyncDiff cannot cut into components; the message says what did not match."""


def _refuse(model, reason: str) -> UnsplittableModelError:
    return UnsplittableModelError(f"AsyncDenoiser cannot split {type(model).__name__} into components: {reason}")


class BlockStreams:
    """A model's blocks in forward order and the streams entering each of them.

    ``names[b]``: the stream arguments of block ``b`` (also what it returns, in its return order; ``patterns[b]``
    its pattern).
    """

    def __init__(self, model: torch.nn.Module):
        inner = getattr(model, "original_model", model)
        self.model_class = type(inner).__name__
        if self.model_class in REFUSED:
            raise _refuse(inner, REFUSED[self.model_class])
        try:
            adapter = adapter_for(inner)
        except (BlockPatternError, TypeError) as exc:
            raise _refuse(inner, str(exc)) from None
        if self.model_class in PATTERNS:
            try:
                refs = find_blocks(inner)
            except BlockPatternError as exc:
                raise _refuse(inner, str(exc)) from None
            self.blocks = [r.module for r in refs]
            self.patterns = [r.pattern for r in refs]
            self.labels = [f"{r.list_name}[{r.list_index}]" for r in refs]
        else:  # a registered branch adapter (the block-level one matches table entries only): the residual stream
            self.blocks = list(adapter.blocks(inner))
            self.patterns = [BlockPattern((HIDDEN,))] * len(self.blocks)
            self.labels = [f"block {b}" for b in range(len(self.blocks))]
        self.names = [tuple(p.returns) for p in self.patterns]
        self.signatures = [inspect.signature(b.forward) for b in self.blocks]

    def __len__(self) -> int:
        return len(self.blocks)

    # ------------------------------------------------------------------ a block's arguments
    def _bind(self, b: int, args, kwargs) -> inspect.BoundArguments:
        try:
            return self.signatures[b].bind(*args, **kwargs)
        except TypeError as exc:
            raise _refuse_block(self, b, f"it was called with arguments its forward does not take ({exc})") from None

    def read(self, b: int, args, kwargs) -> tuple[torch.Tensor, ...]:
        """The streams entering block ``b`` from its call arguments (checked: all tensors)."""
        bound = self._bind(b, args, kwargs).arguments
        out = []
        for n in self.names[b]:
            x = bound.get(n)
            if not isinstance(x, torch.Tensor):
                raise _refuse_block(self, b, f"its argument {n!r} is a {type(x).__name__}, not a tensor, so it "
                                             f"cannot be the state handed from one component to the next")
            out.append(x)
        return tuple(out)

    def replace(self, b: int, args, kwargs, state) -> tuple[tuple, dict]:
        """Block ``b``'s call arguments with its streams replaced by ``state``."""
        self.check_state(b, state)
        bound = self._bind(b, args, kwargs)
        for n, x in zip(self.names[b], state):
            bound.arguments[n] = x
        return bound.args, bound.kwargs

    def outputs(self, b: int, out) -> tuple[torch.Tensor | None, ...]:
        """Block ``b``'s return value as the tuple of its streams (a stream it does not return is None)."""
        names = self.names[b]
        if len(names) == 1:
            if not isinstance(out, torch.Tensor):
                raise _refuse_block(self, b, f"it returned a {type(out).__name__}; the pattern says it returns "
                                             f"{names[0]} alone")
            return (out,)
        if not isinstance(out, (tuple, list)) or len(out) != len(names):
            raise _refuse_block(self, b, f"it returned a {type(out).__name__}; the pattern says it returns "
                                         f"({', '.join(names)})")
        return tuple(out)

    def check_state(self, b: int, state) -> None:
        if not isinstance(state, (tuple, list)) or len(state) != len(self.names[b]):
            raise ValueError(f"the state entering {self.labels[b]} is the streams ({', '.join(self.names[b])}); "
                             f"got {type(state).__name__}"
                             + (f" of {len(state)}" if isinstance(state, (tuple, list)) else ""))

    def passthrough(self, b: int):
        """A forward for block ``b`` that returns its streams unchanged (in the block's return order)."""
        pattern, sig = self.patterns[b], self.signatures[b]

        def forward(*args, **kwargs):
            return pattern.passed_through(sig.bind(*args, **kwargs).arguments)

        return forward

    # ------------------------------------------------------------------ running part of the forward
    @contextlib.contextmanager
    def bypassed(self, keep: range):
        """Blocks outside ``keep`` return their streams unchanged while the context is open."""
        patched = []
        try:
            for b, blk in enumerate(self.blocks):
                if b not in keep:
                    patched.append((blk, blk.__dict__.get("forward")))
                    blk.forward = self.passthrough(b)
            yield
        finally:
            for blk, fwd in patched:
                if fwd is None:
                    del blk.forward
                else:
                    blk.forward = fwd


def _refuse_block(streams: BlockStreams, b: int, what: str) -> UnsplittableModelError:
    return UnsplittableModelError(f"AsyncDenoiser cannot split {streams.model_class} into components: "
                                  f"{streams.labels[b]} ({type(streams.blocks[b]).__name__}): {what}")


def state_specs(state) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every stream of a boundary state."""
    return [(tuple(x.shape), x.dtype) for x in state]
