"""Splitting a transformer's blocks into contiguous components of equal measured cost.

Each block is timed on the arguments the model's own forward passes to it for a sample input
(recorded on one forward run: for Flux the double blocks, then the single blocks, each with its
text and image streams), then the blocks are cut into ``n`` contiguous runs minimising the most
expensive run. Nothing here is specific to a model id: any model the adapters or the block pattern
table support can be split; sample inputs are built in for DiT and PixArt and passed (or taken from
the first call) for the others.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..adapters import adapter_for
from .streams import BlockStreams, UnsplittableModelError


@dataclass
class Split:
    """How the blocks are divided among the components."""

    ranges: list[tuple[int, int]]       #: component n runs blocks ``ranges[n][0] .. ranges[n][1] - 1``
    block_costs: list[float]            #: relative (or measured, in seconds) cost of every block
    method: str = "measure"             #: "measure", "uniform" or "given"
    info: dict = field(default_factory=dict)

    @property
    def component_costs(self) -> list[float]:
        return [sum(self.block_costs[a:b]) for a, b in self.ranges]

    @property
    def imbalance(self) -> float:
        """Most expensive component over the mean component cost (1.0 = perfectly balanced)."""
        c = self.component_costs
        return max(c) / (sum(c) / len(c)) if sum(c) > 0 else 1.0

    def to_dict(self) -> dict:
        return dict(ranges=[list(r) for r in self.ranges], block_costs=list(self.block_costs),
                    component_costs=self.component_costs, imbalance=self.imbalance, method=self.method, **self.info)


def balanced_split(costs: Sequence[float], n: int) -> list[tuple[int, int]]:
    """Cut ``costs`` into ``n`` non-empty contiguous runs minimising the largest run's sum.

    Exact dynamic programme, O(n * len(costs)^2). Among optimal cuts the one with the most even
    remaining runs is not searched for; ties keep earlier cuts earlier.
    """
    m = len(costs)
    if not 1 <= n <= m:
        raise ValueError(f"cannot split {m} blocks into {n} non-empty components")
    prefix = [0.0]
    for c in costs:
        if c < 0:
            raise ValueError("block costs must be non-negative")
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[k][j]: smallest achievable max-run cost putting the first j blocks in k runs
    best = [[inf] * (m + 1) for _ in range(n + 1)]
    cut = [[0] * (m + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for k in range(1, n + 1):
        for j in range(k, m - (n - k) + 1):
            for i in range(k - 1, j):
                v = max(best[k - 1][i], prefix[j] - prefix[i])
                if v < best[k][j] - 1e-15:
                    best[k][j], cut[k][j] = v, i
    ranges, j = [], m
    for k in range(n, 0, -1):
        i = cut[k][j]
        ranges.append((i, j))
        j = i
    return ranges[::-1]


def uniform_split(num_blocks: int, n: int) -> list[tuple[int, int]]:
    """Equal block counts (the first components get one more block when they do not divide)."""
    return balanced_split([1.0] * num_blocks, n)


# ------------------------------------------------------------------------------ sample inputs
def example_inputs(model, batch: int = 2, text_tokens: int = 8) -> dict:
    """Keyword arguments for one forward call of a supported diffusers transformer (random latents).

    Only used to time blocks; pass your own (``sample_inputs=``) for models not listed here or to
    time at the batch and resolution you will sample at.
    """
    inner = getattr(model, "original_model", model)
    name = type(inner).__name__
    if name not in ("DiTTransformer2DModel", "PixArtTransformer2DModel"):
        raise TypeError(f"no built-in sample input for {name}; pass sample_inputs=dict(...) (the forward's keyword "
                        f"arguments) or balance='uniform'")
    cfg = inner.config
    p = next(inner.parameters())
    g = torch.Generator().manual_seed(0)
    size = int(cfg.sample_size)
    x = torch.randn(batch, int(cfg.in_channels), size, size, generator=g).to(device=p.device, dtype=p.dtype)
    t = torch.full((batch,), 500, device=p.device, dtype=torch.long)
    if name == "DiTTransformer2DModel":
        return dict(hidden_states=x, timestep=t, class_labels=torch.zeros(batch, dtype=torch.long, device=p.device))
    if name == "PixArtTransformer2DModel":
        enc = torch.randn(batch, text_tokens, int(cfg.caption_channels), generator=g).to(device=p.device, dtype=p.dtype)
        added = {"resolution": None, "aspect_ratio": None}
        if inner.use_additional_conditions:
            added = {"resolution": torch.full((batch, 2), float(size * 8), device=p.device, dtype=p.dtype),
                     "aspect_ratio": torch.ones(batch, 1, device=p.device, dtype=p.dtype)}
        return dict(hidden_states=x, timestep=t, encoder_hidden_states=enc,
                    encoder_attention_mask=torch.ones(batch, text_tokens, device=p.device),
                    added_cond_kwargs=added)


# ------------------------------------------------------------------------------ timing
class _StopForward(Exception):
    pass


def block_calls(model, inputs: dict) -> list[tuple[tuple, dict]]:
    """The arguments the model's own forward passes to every block for forward arguments ``inputs`` (one
    forward run; the streams entering each block are copied as they arrive)."""
    st = BlockStreams(model)
    inner = getattr(model, "original_model", model)
    calls: dict[int, tuple[tuple, dict]] = {}

    def record(b):
        def hook(_m, a, kw):
            state = tuple(x.clone() for x in st.read(b, a, kw))
            calls[b] = st.replace(b, a, kw, state)
        return hook

    hooks = [blk.register_forward_pre_hook(record(b), with_kwargs=True) for b, blk in enumerate(st.blocks)]
    try:
        with torch.no_grad():
            inner(**inputs, return_dict=False)
    finally:
        for h in hooks:
            h.remove()
    missing = [st.labels[b] for b in range(len(st)) if b not in calls]
    if missing:
        raise UnsplittableModelError(f"AsyncDenoiser cannot time {st.model_class}'s blocks: its forward did not call "
                                     f"{', '.join(missing)}")
    return [calls[b] for b in range(len(st))]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_block_costs(model, sample_inputs: dict | None = None, repeats: int = 5, batch: int = 2,
                        pool_identical: bool = True) -> list[float]:
    """Seconds per call of every block on ``sample_inputs`` (the forward's keyword arguments; built
    from the config when omitted), blocks in forward order (Flux: double blocks, then single blocks).

    Every block runs eagerly on the streams and keyword arguments the model's own forward passes to it
    (recorded on one forward run). Every block is timed ``repeats`` times, the blocks taking turns, and
    the fastest call counts (background load only ever adds time). With ``pool_identical``, blocks
    of identical structure (class, parameter names, shapes and dtypes) get the median of their
    group's times: they do the same work, and pooling keeps timing noise from moving the split.
    """
    inner = getattr(model, "original_model", model)
    if sample_inputs is None:
        sample_inputs = example_inputs(inner, batch=batch)
    blocks = BlockStreams(inner).blocks
    calls = block_calls(inner, sample_inputs)
    dev = next(inner.parameters()).device
    with torch.no_grad():
        for blk, (a, kw) in zip(blocks, calls):  # an untimed first call of every block
            blk(*a, **kw)
        best = [float("inf")] * len(blocks)
        for _ in range(repeats):
            for i, blk in enumerate(blocks):
                a, kw = calls[i]
                _sync(dev)
                t0 = time.perf_counter()
                blk(*a, **kw)
                _sync(dev)
                best[i] = min(best[i], time.perf_counter() - t0)
    if not pool_identical:
        return best
    groups: dict[tuple, list[int]] = {}
    for i, blk in enumerate(blocks):
        groups.setdefault(_structure(blk), []).append(i)
    costs = list(best)
    for members in groups.values():
        pooled = statistics.median(best[i] for i in members)
        for i in members:
            costs[i] = pooled
    return costs


def measure_final_layer_cost(model, sample_inputs: dict | None = None, repeats: int = 5, batch: int = 2) -> float:
    """Seconds of the work after the last block (final norm, projection, unpatchify): only the last
    component does it. (The input embedding is not counted: every component computes it.)

    Models with a branch adapter run the adapter's ``finish``; the others (SD3, Flux, ...) are timed through
    their own forward: a call whose blocks all pass their streams through, less a call stopped in front of the
    first block (the embedding), each the fastest of ``repeats + 1``."""
    from ..adapters import StepInputs
    from ..schedule import BRANCH_LEVEL

    inner = getattr(model, "original_model", model)
    if sample_inputs is None:
        sample_inputs = example_inputs(inner, batch=batch)
    ad = adapter_for(inner)
    if ad.level != BRANCH_LEVEL:
        return _final_by_difference(inner, sample_inputs, repeats)
    inputs = ad.bind(inner, (), dict(sample_inputs))
    inputs = StepInputs(args=inputs.args)
    best = float("inf")
    with torch.no_grad():
        h, ctx = ad.prepare(inner, inputs)
        for _ in range(repeats + 1):
            _sync(h.device)
            t0 = time.perf_counter()
            ad.finish(inner, h, ctx, inputs)
            _sync(h.device)
            best = min(best, time.perf_counter() - t0)
    return best


def _final_by_difference(inner, inputs: dict, repeats: int) -> float:
    st = BlockStreams(inner)
    dev = next(inner.parameters()).device

    def stop(_m, _a, _kw):
        raise _StopForward()

    def fastest(run) -> float:
        best = float("inf")
        for _ in range(repeats + 1):
            _sync(dev)
            t0 = time.perf_counter()
            run()
            _sync(dev)
            best = min(best, time.perf_counter() - t0)
        return best

    def embed_only():
        hook = st.blocks[0].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            inner(**inputs, return_dict=False)
        except _StopForward:
            pass
        finally:
            hook.remove()

    def without_blocks():
        inner(**inputs, return_dict=False)

    with torch.no_grad():
        t_embed = fastest(embed_only)
        with st.bypassed(range(0)):
            t_all = fastest(without_blocks)
    return max(0.0, t_all - t_embed)


def _structure(block) -> tuple:
    return (type(block).__name__,) + tuple((n, tuple(p.shape), str(p.dtype)) for n, p in block.named_parameters())


def schedule_weights(cached) -> list[float]:
    """For a module of ``compile_schedule`` (every level): each block's average fraction of its full cost over the
    schedule's steps (units weighed by their FLOPs as the schedule weighs them; a reused block counts as nothing)."""
    from ..runtime.block_flops import block_compute_fractions

    return block_compute_fractions(cached.schedule)
