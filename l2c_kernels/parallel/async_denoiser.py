"""AsyncDiff (Chen et al., NeurIPS 2024): the transformer's blocks split across processes, each
process computing its component from the previous step's output of the component before it.

    # torchrun --nproc_per_node=2 script.py   (every rank runs the same script, same seed)
    from l2c_kernels import parallel
    pipe.transformer = parallel.AsyncDenoiser(pipe.transformer, num_components=2, warm_up=3)
    images = pipe(..., generator=torch.Generator().manual_seed(0)).images   # same on every rank

Schedule of the computation, with N components on N ranks (``stride=1``):

* steps ``0 .. warm_up-1``: every rank runs the whole model, exactly as without AsyncDenoiser,
  and keeps the state at the component boundaries: the token streams entering the next
  component's first block (``hidden_states`` for DiT / PixArt / Wan; text and image streams for
  the joint-attention blocks of SD3 and Flux -- Flux's double and single blocks are one sequence
  of blocks here, cut wherever the costs say);
* every later step t: rank n runs component n on the output of component n-1 *at step t-1*
  (rank 0 on the embedded latents of step t), all at once; the ranks then exchange their
  outputs with one ``all_gather``; the last component's output (through the final layer) is the
  noise prediction for step t, returned on every rank so every rank's sampler takes the same
  step.

Stride denoising (``stride=2``, N components on N + 1 ranks, the paper's setting): the steps
after the warm-up go in pairs (s, s+1) and one parallel round produces both predictions.
Ranks 0..N-1 run their component conditioned on step s+1's timestep (rank 0 on the latents of
step s, the others on the previous round's outputs); the extra rank N runs the last component
on the same input as rank N-1 but conditioned on step s. Rank N's output is the prediction for
step s, rank N-1's the prediction for step s+1, so the call for step s+1 returns at once with
no computation or communication: each rank computes and communicates once per two steps. The
timestep of step s+1 is taken from ``timesteps`` (or a ``CachedTransformer``'s schedule) when
known, otherwise extrapolated from the last two timesteps (exact for evenly spaced schedules;
a different timestep at step s+1 raises an error). Any stride S >= 1 works the same way with
N + S - 1 ranks; the paper evaluates 1 and 2.

Without a process group (world size 1) the module is the wrapped model. ``emulate=True`` runs
the asynchronous schedule of all ranks in one process (no speedup): the same computation and
the same images as the multi-process run, for checking quality on one device.
"""
from __future__ import annotations

import time
import warnings
from collections import deque

import torch
from torch import nn

from ..adapters import adapter_for
from ..schedule import next_step_index, same_timestep
from . import comm as _comm
from .comm import AsyncDiffError, Comm, crc, pack, payload_bytes, unpack_header, unpack_payloads
from .partition import (Split, balanced_split, example_inputs, measure_block_costs, measure_final_layer_cost,
                        schedule_weights)
from .runners import ModelRunner, is_cached, runner_for
from .streams import BlockStreams, state_specs
from .timesteps import TimestepScale

_VERSION = 1


class AsyncDenoiser(nn.Module):
    """A drop-in transformer that runs AsyncDiff across the ranks of a process group.

    Args:
        transformer: a diffusers transformer with a branch adapter (``DiTTransformer2DModel``,
            ``PixArtTransformer2DModel``) or in the block pattern table (``FluxTransformer2DModel``,
            ``SD3Transformer2DModel``, ...; :mod:`l2c_kernels.adapters.patterns`), or a branch-level
            :class:`~l2c_kernels.CachedTransformer`; every rank holds the full weights. A model whose blocks
            cannot be cut is refused with :class:`UnsplittableModelError` naming what did not match.
        num_components: N, the number of contiguous block runs (one per rank with ``stride=1``).
        stride: 1, or 2 for stride denoising (N + 1 ranks); the world size must be
            ``num_components + stride - 1``.
        warm_up: number of first steps run whole and exact (at least 1).
        timeout_s: every collective fails with :class:`AsyncDiffError` after this many seconds
            (also the timeout of a process group this module creates).
        process_group: the group to run on; default: the default group, created from torchrun's
            environment variables when not initialised yet (NCCL for CUDA models, gloo otherwise).
        balance: ``"measure"`` (time each block and cut the blocks into contiguous runs of equal
            measured cost, averaged over the ranks; at construction on ``sample_inputs`` or the built-in
            inputs of DiT / PixArt, otherwise on the first call's own inputs), ``"uniform"`` (equal
            block counts), a sequence of per-block costs (of full computation; for a
            ``CachedTransformer`` they are weighted by how often the schedule computes each block),
            or a :class:`Split` (e.g. ``other.split``) to use as it is.
        timesteps: the sampler's timesteps (``pipe.scheduler.timesteps``), if known (used to track
            steps, to agree on the number of steps, and by ``stride > 1`` to condition on the coming
            steps). For families whose pipelines pass ``t / 1000`` (Flux, ...) the transformer's
            timestep is mapped to the sampler's as the block pattern table says.
        num_steps: number of sampling steps, if known and ``timesteps`` is not given.
        sample_inputs: forward keyword arguments used to time the blocks (default: built from
            the model config, batch 2, for DiT / PixArt; the first call's inputs for the others).
        emulate: run all ranks' work in this process (no process group needed).
    """

    def __init__(self, transformer: nn.Module, num_components: int = 2, stride: int = 1, warm_up: int = 3,
                 timeout_s: float = 60.0, process_group=None, balance="measure", *, timesteps=None,
                 num_steps: int | None = None, sample_inputs: dict | None = None, emulate: bool = False,
                 backend: str | None = None):
        super().__init__()
        self.transformer = transformer
        inner = getattr(transformer, "original_model", transformer)
        if inner is not transformer and not is_cached(transformer):
            raise TypeError(f"AsyncDenoiser takes a plain diffusers transformer or a module of compile_schedule; got "
                            f"a {type(transformer).__name__} wrapping one: pass its original_model")
        self.streams = BlockStreams(inner)  # refuses, naming the reason, a model it cannot split
        self.adapter = adapter_for(inner)
        self.timestep_scale = TimestepScale(inner)
        self._inner = [inner]  # not registered twice
        self.num_components = int(num_components)
        self.stride = int(stride)
        self.warm_up = int(warm_up)
        self.timeout_s = float(timeout_s)
        self.emulate = bool(emulate)
        if self.num_components < 1 or self.stride < 1 or self.warm_up < 0:
            raise ValueError("num_components and stride must be >= 1 and warm_up >= 0")
        nblocks = len(self.streams)
        if self.num_components > nblocks:
            raise ValueError(f"num_components={self.num_components} exceeds the model's {nblocks} blocks")
        if timesteps is None and is_cached(transformer):
            timesteps = transformer.schedule.timesteps
        self.timesteps = None if timesteps is None else [_number(t) for t in timesteps]
        self.num_steps = len(self.timesteps) if self.timesteps is not None else (num_steps or None)
        self.world_needed = self.num_components + self.stride - 1

        # -------------------------------------------------------------- where the ranks are
        self.comm: Comm | None = None
        self.rank = 0
        self.world = 1
        if not self.emulate:
            dev = _device_of(inner)
            if process_group is not None or _comm.ensure_process_group(dev, self.timeout_s, backend):
                self.comm = Comm(process_group, self.timeout_s, dev)
                self.rank, self.world = self.comm.rank, self.comm.world
                if self.world == 1:
                    self.comm = None
            elif self.world_needed > 1:
                warnings.warn(f"AsyncDenoiser(num_components={self.num_components}, stride={self.stride}) found no "
                              f"process group: running the plain model in this process. Launch with torchrun "
                              f"--nproc_per_node={self.world_needed} to split it.", stacklevel=2)
        self.active = self.emulate or self.comm is not None
        if self.active and self.warm_up < 1:
            raise ValueError("warm_up must be at least 1: the first asynchronous step needs the previous step's "
                             "component outputs")

        # -------------------------------------------------------------- agreement, then the split
        if self.comm is not None:
            # first, so that ranks started with different settings all fail with the same clear error
            self.comm.check_agreement(self._config_fields(inner, balance))
            if self.world != self.world_needed:
                raise ValueError(f"AsyncDenoiser with num_components={self.num_components} and stride={self.stride} "
                                 f"needs {self.world_needed} ranks (num_components + stride - 1); the process group "
                                 f"has {self.world}. Launch with torchrun --nproc_per_node={self.world_needed}.")
        #: None until the first call when the blocks are timed on that call's inputs (balance="measure" on a
        #: model without built-in sample inputs and no ``sample_inputs``)
        self._balance = balance
        self.split = self._make_split(inner, balance, sample_inputs) if self.active else Split(
            [(0, nblocks)], [1.0] * nblocks, "single-process")

        # -------------------------------------------------------------- who computes what
        n, s = self.num_components, self.stride
        #: role of every rank: (component, offset of the step it is conditioned on within a round)
        self.roles = [(r, s - 1) for r in range(n)] + [(n - 1, k) for k in range(s - 1)]
        if self.emulate:
            self._runners = self._emulation_runners(transformer)
        else:
            self._runners = {self.rank: runner_for(transformer)}
        self._local_ranks = sorted(self._runners) if self.active else []

        #: seconds per asynchronous round spent computing this rank's component ("compute") and in the
        #: collective, waiting for the other ranks included ("comm"); seconds per call ("call"); last 4096
        self.timings: dict[str, deque] = {k: deque(maxlen=4096) for k in ("compute", "comm", "call")}
        self._forced_step: int | None = None
        self._generation = 0
        self.reset()

    # ------------------------------------------------------------------ pipeline-facing attributes
    @property
    def config(self):
        return self._inner[0].config

    @property
    def dtype(self) -> torch.dtype:
        return next(self._inner[0].parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self._inner[0].parameters()).device

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            mods = self.__dict__.get("_modules", {})
            if "transformer" not in mods:
                raise
            return getattr(mods["transformer"], name)

    # ------------------------------------------------------------------ introspection
    def _settled_split(self) -> Split:
        if self.split is None:
            raise AsyncDiffError("the split is made on the first call (the blocks are timed on its inputs); call the "
                                 "model once, or pass sample_inputs=... or balance='uniform'")
        return self.split

    @property
    def component_ranges(self) -> list[tuple[int, int]]:
        """Blocks of every component, in forward order (Flux: double blocks, then single blocks): component n
        runs blocks ``start .. end-1``."""
        return list(self._settled_split().ranges)

    @property
    def block_costs(self) -> list[float]:
        return list(self._settled_split().block_costs)

    @property
    def component_costs(self) -> list[float]:
        return self._settled_split().component_costs

    @property
    def block_labels(self) -> list[str]:
        """Every block's place in the model (``"transformer_blocks[0]"``, ``"single_transformer_blocks[3]"``)."""
        return list(self.streams.labels)

    @property
    def current_step(self) -> int | None:
        return self._step

    def describe(self) -> dict:
        """Settings, split and measured costs (JSON-serialisable)."""
        return dict(num_components=self.num_components, stride=self.stride, warm_up=self.warm_up,
                    world_size=self.world if not self.emulate else self.world_needed, rank=self.rank,
                    emulate=self.emulate, active=self.active, roles=[list(r) for r in self.roles],
                    split=None if self.split is None else self.split.to_dict(), num_steps=self.num_steps,
                    block_labels=self.block_labels)

    # ------------------------------------------------------------------ step control
    def reset(self) -> None:
        """Forget the current generation: the next call is step 0 (a warm-up step)."""
        self._step: int | None = None
        self._first_t = None
        self._last_t = None
        self._stale: list[torch.Tensor] | None = None
        self._pending: dict[int, tuple[float, torch.Tensor]] = {}
        self._shapes = None
        for r in getattr(self, "_runners", {}).values():
            r.reset()

    def set_step(self, step: int) -> None:
        """Make the next call step ``step`` whatever its timestep (every rank must do the same)."""
        if step < 0 or (self.num_steps is not None and step >= self.num_steps):
            raise ValueError(f"step {step} out of range (num_steps={self.num_steps})")
        self._forced_step = int(step)

    def _resolve_step(self, t) -> int:
        if self._forced_step is not None:
            s, self._forced_step = self._forced_step, None
            return s
        if t is None:
            raise ValueError("the transformer was called without a timestep; pass one or call set_step()")
        if self.timesteps is not None:
            ts = self.timesteps
            s = next_step_index(ts, t, self._step)
            if s is not None:
                return s
            nxt = 0 if self._step is None else self._step + 1
            raise AsyncDiffError(f"timestep {t} is not the next of the {len(ts)} timesteps given "
                                 f"(expected {ts[nxt] if nxt < len(ts) else 'a new generation at ' + str(ts[0])}); "
                                 f"call reset() or set_step()")
        if self._step is None or same_timestep(self._first_t, t) or t > self._last_t:
            return 0  # a new generation: the first timestep again, or the timesteps went back up
        s = self._step + 1
        if self.num_steps is not None and s >= self.num_steps:
            raise AsyncDiffError(f"call {s + 1} of a generation of num_steps={self.num_steps}; call reset()")
        return s

    # ------------------------------------------------------------------ forward
    def forward(self, *args, **kwargs):
        if not self.active:
            return self.transformer(*args, **kwargs)
        t0 = time.perf_counter()
        inputs = self.adapter.bind(self._inner[0], args, kwargs)
        a = inputs.args
        self._check_input(a.get("hidden_states"))
        t = self.timestep_scale.to_sampler(_timestep_value(a.get("timestep")))
        step = self._resolve_step(t)
        if step == 0:
            self._start_generation(a, t)
            if self.split is None:
                self.split = self._make_split(self._inner[0], self._balance, a)
        with torch.no_grad():
            if step < self.warm_up:
                out = self._warm_up_step(a, step, t)
            elif step in self._pending:
                out = self._pending_step(step, t)
            else:
                out = self._async_round(a, step, t)
        self._step, self._last_t = step, t
        self.timings["call"].append(time.perf_counter() - t0)
        if not inputs.return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)

    def _check_input(self, x) -> None:
        """The latents must match the weights' dtype and device (a rank would otherwise fail inside a block
        or send tensors its peers cannot read)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"AsyncDenoiser: hidden_states must be a tensor, got {type(x).__name__}")
        if x.dtype != self.dtype or x.device != self.device:
            raise ValueError(f"AsyncDenoiser: hidden_states is {x.dtype} on {x.device} but the model's weights are "
                             f"{self.dtype} on {self.device}; cast the latents (or the model) to match")

    # ------------------------------------------------------------------ the three kinds of call
    def _start_generation(self, a: dict, t) -> None:
        for r in self._runners.values():
            r.reset()
        self._stale, self._pending, self._first_t, self._last_t = None, {}, t, None
        self._generation += 1
        x = a["hidden_states"]
        if not bool(torch.isfinite(x).all()):  # once per generation; ranks would otherwise report NaN sums as a mismatch
            raise ValueError(f"AsyncDenoiser: the latents of step 0 contain NaN or infinite values "
                             f"({int((~torch.isfinite(x)).sum())} of {x.numel()})")
        if self.comm is not None:
            self.comm.check_agreement(
                dict(ndim=x.ndim, **{f"dim{i}": d for i, d in enumerate(x.shape)}, dtype=crc(str(x.dtype)),
                     first_timestep=float(t), num_steps=self.num_steps or -1, latent_sum=float(x.double().sum())),
                what="start-of-generation check (inputs of step 0)")

    def _boundaries(self) -> list[int]:
        """The blocks where components 1 .. N-1 start: the state entering them crosses between processes."""
        return [start for start, _ in self.split.ranges[1:]]

    def _warm_up_step(self, a: dict, step: int, t) -> torch.Tensor:
        cap = self._boundaries()
        out = caps = None
        done = set()
        for r in self._local_ranks:
            runner = self._runners[r]
            if id(runner) in done:
                continue
            done.add(id(runner))
            o, c = runner.full(a, cap, step)
            if out is None:
                out, caps = o, c
        self._stale = [caps[b] for b in cap]
        self._shapes = dict(out=(tuple(out.shape), out.dtype), states=[state_specs(st) for st in self._stale])
        if self.comm is None:
            return out
        got = self._exchange({self.rank: out}, step, t, a["hidden_states"], kinds="out")
        return got[0]  # rank 0's prediction, so every rank's sampler takes the identical step

    def _pending_step(self, step: int, t) -> torch.Tensor:
        t_expected, out = self._pending.pop(step)
        if not same_timestep(t_expected, t):
            raise AsyncDiffError(
                f"step {step} was computed ahead for timestep {t_expected} (stride {self.stride}) but the sampler "
                f"passed {t}; pass timesteps=[...] (the sampler's timesteps) to AsyncDenoiser")
        return out

    def _async_round(self, a: dict, step: int, t) -> torch.Tensor:
        if self._stale is None or self._shapes is None:
            raise AsyncDiffError(f"step {step} is asynchronous but no warm-up step ran in this generation; "
                                 f"start at step 0 or call reset()")
        n, s = self.num_components, self.stride
        ts = [t] + [self._timestep_ahead(step, k, t) for k in range(1, s)]
        t0 = time.perf_counter()
        products = {}
        for r in self._local_ranks:
            comp, k = self.roles[r]
            args_k = a if k == 0 else _with_timestep(a, self.timestep_scale.to_model(ts[k]))
            start, end = self.split.ranges[comp]
            state_in = None if comp == 0 else self._stale[comp - 1]
            products[r] = self._runners[r].component(args_k, start, end, state_in, self._step_index(step + k))
        self.timings["compute"].append(time.perf_counter() - t0)
        if self.comm is not None:
            products = self._exchange(products, step, t, a["hidden_states"], kinds="round")
        self._stale = [products[self._rank_of(c, s - 1)] for c in range(n - 1)]
        for k in range(1, s):
            self._pending[step + k] = (ts[k], products[self._rank_of(n - 1, k)])
        return products[self._rank_of(n - 1, 0)]

    # ------------------------------------------------------------------ helpers
    def _rank_of(self, comp: int, offset: int) -> int:
        """The rank that computes component ``comp`` conditioned on step offset ``offset`` of a round."""
        if comp < self.num_components - 1 or offset == self.stride - 1:
            return comp
        return self.num_components + offset

    def _is_output_rank(self, r: int) -> bool:
        return self.roles[r][0] == self.num_components - 1

    def _step_index(self, s: int) -> int:
        return min(s, self.num_steps - 1) if self.num_steps else s

    def _timestep_ahead(self, step: int, k: int, t):
        if self.timesteps is not None:
            return self.timesteps[min(step + k, len(self.timesteps) - 1)]
        if self._last_t is None:
            raise AsyncDiffError("stride > 1 needs the timesteps: pass timesteps=[...] to AsyncDenoiser")
        delta = self._last_t - t  # spacing of the last two steps
        return max(t - k * delta, 0) if t >= 0 else t - k * delta

    def _exchange(self, products: dict, step: int, t, x: torch.Tensor, kinds: str) -> dict:
        """all_gather of every rank's product with a header; returns {rank: tensor}."""
        mine = products[self.rank]
        out_spec = [self._shapes["out"]]
        states = self._shapes["states"]
        sizes = [payload_bytes(out_spec)] + [payload_bytes(sp) for sp in states]
        nbytes = max(sizes) if kinds == "round" else sizes[0]
        dev = (mine if isinstance(mine, torch.Tensor) else mine[0]).device
        hdr = torch.tensor([self._generation, step, float(t), 0.0, 0.0, 0.0], dtype=torch.float64, device=dev)
        hdr[3] = x.detach().to(dev).double().sum()
        t0 = time.perf_counter()
        bufs = self.comm.all_gather(pack(hdr, mine, nbytes), f"exchange of component outputs at step {step}")
        self.timings["comm"].append(time.perf_counter() - t0)
        self._check_headers(bufs, step)
        got = {}
        for r, b in enumerate(bufs):
            if r == self.rank:
                got[r] = mine
            elif kinds == "out" or self._is_output_rank(r):
                got[r] = unpack_payloads(b, Comm.HEADER, out_spec)[0]
            else:  # the state entering the next component
                got[r] = tuple(unpack_payloads(b, Comm.HEADER, states[self.roles[r][0]]))
        return got

    def _check_headers(self, bufs: list[torch.Tensor], step: int) -> None:
        hdrs = torch.stack([unpack_header(b, Comm.HEADER).cpu() for b in bufs])
        bits = hdrs[:, :4].contiguous().view(torch.int64)
        if bool((bits == bits[0]).all()):
            return
        names = ["generation", "step", "timestep", "latent checksum"]
        bad = [names[i] for i in range(4) if not bool((bits[:, i] == bits[0, i]).all())]
        rows = ", ".join(f"rank {r}: step {int(h[1])} t={h[2].item():g} latent sum={h[3].item():.6g}"
                         for r, h in enumerate(hdrs))
        raise AsyncDiffError(f"rank {self.rank}: the ranks drifted apart at step {step} ({', '.join(bad)} differ: "
                             f"{rows}). Every rank must run the same sampler with the same seed and inputs.")

    def _config_fields(self, inner, balance) -> dict:
        params = list(inner.parameters())
        fingerprint = weights_fingerprint(params)
        sched = getattr(self.transformer, "schedule", None)
        return dict(version=_VERSION, num_components=self.num_components, stride=self.stride,
                    warm_up=self.warm_up, num_steps=self.num_steps or -1,
                    timesteps=crc(repr(self.timesteps)), model_class=crc(type(inner).__name__),
                    num_blocks=self.adapter.num_blocks(inner), parameters=sum(p.numel() for p in params),
                    weights_checksum=fingerprint, dtype=crc(str(self.dtype)),
                    balance=crc(balance if isinstance(balance, str) else repr(balance.ranges)
                                if isinstance(balance, Split) else repr([float(c) for c in balance])),
                    cache_schedule=crc(sched.to_json()) if sched is not None else 0)

    def _make_split(self, inner, balance, sample_inputs) -> Split:
        nb = len(self.streams)
        if isinstance(balance, Split):
            if len(balance.ranges) != self.num_components or balance.ranges[-1][1] != nb:
                raise ValueError(f"the given split {balance.ranges} does not cut {nb} blocks into "
                                 f"{self.num_components} components")
            return balance
        info, final = {}, 0.0
        if isinstance(balance, str):
            if balance == "uniform":
                costs, method = [1.0] * nb, "uniform"
            elif balance == "measure":
                if sample_inputs is None:
                    try:
                        sample_inputs = example_inputs(inner)
                    except TypeError:
                        return None  # timed on the first call's own inputs
                costs, method = measure_block_costs(inner, sample_inputs), "measure"
                final = measure_final_layer_cost(inner, sample_inputs)
                if self.comm is not None:  # the same numbers, hence the same split, on every rank
                    *costs, final = self.comm.mean(costs + [final], "averaging the measured block costs")
                info["unit"] = "seconds per block call on the sample input"
                info["final_layer_cost"] = final
            else:
                raise ValueError(f"balance must be 'measure', 'uniform' or a list of {nb} block costs; got {balance!r}")
        else:
            costs, method = [float(c) for c in balance], "given"
            if len(costs) != nb:
                raise ValueError(f"balance has {len(costs)} costs for {nb} blocks")
        if is_cached(self.transformer):
            # a block the schedule reuses at most steps costs little on average
            w = schedule_weights(self.transformer)
            info["schedule_weights"] = w
            costs = [c * wi for c, wi in zip(costs, w)]
        costs = costs[:-1] + [costs[-1] + final]  # only the last component runs the final layer
        return Split(balanced_split(costs, self.num_components), costs, method, info)

    def _emulation_runners(self, transformer) -> dict:
        ranks = range(self.world_needed)
        if is_cached(transformer):
            from ..runtime.cached_transformer import compile_schedule

            # each emulated rank keeps its own cache buffers, as separate processes would
            runners = {0: runner_for(transformer)}
            for r in ranks:
                if r:
                    runners[r] = runner_for(compile_schedule(transformer.original_model, transformer.schedule,
                                                             cuda_graphs=False))
            return runners
        shared = ModelRunner(transformer)
        return {r: shared for r in ranks}


# ---------------------------------------------------------------------- small helpers
def weights_fingerprint(params, chunk: int = 1 << 20) -> float:
    """``sum_k sum_i p_k[i] * w_ki`` in float64 with weights in [0.5, 1.5) that depend on the position
    (golden-ratio sequence), so that permuted or swapped weights change it as well as changed values
    (a plain sum would miss the first). Computed in chunks where the weights live."""
    total = torch.zeros((), dtype=torch.float64)
    for k, p in enumerate(params):
        flat = p.detach().reshape(-1)
        for start in range(0, flat.numel(), chunk):
            part = flat[start:start + chunk].double()
            pos = torch.arange(start, start + part.numel(), dtype=torch.float64, device=part.device)
            w = torch.frac(pos * 0.6180339887498949 + k * 0.41421356237309515) + 0.5
            total += (part * w).sum().cpu()
    return float(total)


def _device_of(model) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _number(t):
    if isinstance(t, torch.Tensor):
        t = t.item()
    return float(t)


def _timestep_value(ts):
    if ts is None:
        return None
    if isinstance(ts, torch.Tensor):
        return float(ts.reshape(-1)[0].item()) if ts.numel() else None
    return float(ts)


def _with_timestep(a: dict, t) -> dict:
    out = dict(a)
    ts = a.get("timestep")
    if isinstance(ts, torch.Tensor):
        v = round(t) if not ts.is_floating_point() else t
        out["timestep"] = torch.full_like(ts, v)
    elif isinstance(ts, int):
        out["timestep"] = int(round(t))
    else:
        out["timestep"] = t
    return out
