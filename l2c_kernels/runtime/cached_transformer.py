"""The drop-in module returned by :func:`compile_schedule`."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..adapters import adapter_for
from ..schedule import Schedule, ScheduleError, next_step_index
from .caches import CacheSet
from .cuda_graphs import GraphCache, signature
from .plan import StepPlan, collapsible_steps, compile_plans


class CachedTransformer(nn.Module):
    """A diffusers transformer that follows a static cache schedule.

    Same forward signature and output type as the wrapped model; the model itself is not
    modified and its weights are shared. The step is found from the timestep passed in (a new
    generation starts when the schedule's first timestep comes again); ``set_step`` / ``reset``
    control it explicitly.
    """

    def __init__(self, model: nn.Module, schedule: Schedule, *, cuda_graphs: bool | str = "auto",
                 torch_compile: bool | dict = False, cfg_collapse: bool = True, max_signatures: int = 4):
        super().__init__()
        self.adapter = adapter_for(model)
        schedule.validate_for(model)
        self.original_model = model  # registered: .to()/.half() reach the shared weights
        self.schedule = schedule
        self.plans: list[StepPlan] = compile_plans(schedule)
        self.collapsible = collapsible_steps(schedule) if cfg_collapse else [False] * schedule.num_steps
        self._diverged = False  # halves differed at a collapsible step of this generation
        self.collapsed_calls = 0
        self.cuda_graphs = cuda_graphs
        self.max_signatures = max_signatures
        self._graphs = GraphCache()
        self._caches: dict[tuple, CacheSet] = {}
        self._gen_sig: tuple | None = None
        self._step: int | None = None
        self._forced_step: int | None = None
        self._run = self._run_plan
        if torch_compile:
            opts = dict(fullgraph=True, dynamic=False)
            if isinstance(torch_compile, dict):
                opts.update(torch_compile)
            self._run = torch.compile(self._run_plan, **opts)
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit,
                                                        4 * len(set(map(id, self.plans))))

    # ------------------------------------------------------------ pipeline-facing attributes
    @property
    def config(self):
        return self.original_model.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.original_model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.original_model.parameters()).device

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["original_model"], name)

    # ------------------------------------------------------------ step control
    @property
    def current_step(self) -> int | None:
        """Index of the step run last (None before the first call or after ``reset``)."""
        return self._step

    def set_step(self, step: int) -> None:
        """Make the next call run step ``step`` of the schedule, whatever timestep it gets."""
        if not 0 <= step < self.schedule.num_steps:
            raise ValueError(f"step {step} out of range: the schedule has {self.schedule.num_steps} steps")
        self._forced_step = step

    def reset(self) -> None:
        """Forget the current generation: the next call must be step 0 (which fills the caches)."""
        self._step, self._forced_step, self._gen_sig = None, None, None
        self._diverged = False
        for c in self._caches.values():
            c.filled.clear()
            c.half_dirty.clear()

    def release(self) -> None:
        """Free CUDA graphs and cache buffers (they are rebuilt on the next call)."""
        self._graphs.release()
        self._caches.clear()
        self.reset()

    def num_graphs(self) -> int:
        return self._graphs.num_graphs()

    def distinct_plans(self) -> int:
        return len({p.key for p in self.plans})

    def cache_bytes(self) -> int:
        return sum(c.nbytes() for c in self._caches.values())

    def _resolve_step(self, timestep) -> int:
        if self._forced_step is not None:
            s, self._forced_step = self._forced_step, None
            return s
        if timestep is None:
            raise ValueError("the transformer was called without a timestep; pass one or call set_step()")
        if isinstance(timestep, torch.Tensor):
            t = timestep.reshape(-1)[0].item() if timestep.numel() else None
        else:
            t = float(timestep)
        s = next_step_index(self.schedule.timesteps, t, self._step)
        if s is not None:
            return s
        return self.schedule.step_index(t, after=self._step)  # raises with both step lists if unknown

    # ------------------------------------------------------------ forward
    def forward(self, *args, **kwargs):
        inputs = self.adapter.bind(self.original_model, args, kwargs)
        step = self._resolve_step(self.adapter.timestep_tensor(inputs))
        plan = self.plans[step]
        x = self.adapter.hidden_input(inputs)
        sig = signature(inputs.args)
        if step == 0:
            self._gen_sig = sig
            self._diverged = False
            caches = self._cache_set(sig, x)
            caches.filled.clear()
            caches.half_dirty.clear()
        else:
            if self._gen_sig is None:
                self._gen_sig = sig
            elif sig != self._gen_sig:
                raise ValueError(
                    f"input shapes changed in the middle of a generation (step {step}); caches hold data for "
                    f"the previous shapes. Start a new generation at step 0 or call reset().")
            caches = self._cache_set(sig, x)
        self._check_filled(step, plan, caches)
        collapse = self._can_collapse(step, inputs.args)
        args = self._half_args(inputs.args) if collapse else inputs.args
        with torch.no_grad():
            if not collapse:
                self._sync_halves(caches)
            if self._use_graphs(x):
                out = self._graphs.run((plan.key, id(caches), collapse), args,
                                       lambda a: self._run(plan, a, caches, collapse))
            else:
                out = self._run(plan, args, caches, collapse)
            if collapse:
                out = torch.cat([out, out])
                self.collapsed_calls += 1
        self._mark_filled(plan, caches, collapse)
        self._step = step
        if not inputs.return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)

    def _use_graphs(self, x: torch.Tensor) -> bool:
        if self.cuda_graphs is False or self._graphs.disabled or x.device.type != "cuda":
            return False
        return not torch.compiler.is_compiling()

    def _cache_set(self, sig: tuple, x: torch.Tensor) -> CacheSet:
        caches = self._caches.get(sig)
        if caches is None:
            while len(self._caches) >= self.max_signatures:  # drop the oldest shapes and their graphs
                old = next(iter(self._caches))
                del self._caches[old]
                self._graphs.release()
            caches = self._caches[sig] = CacheSet(self._hidden_like(x))
        return caches

    def _hidden_like(self, x: torch.Tensor) -> torch.Tensor:
        """A meta tensor with the residual stream's shape ``[B, N, C]`` for input ``x``."""
        cfg = self.original_model.config
        p = cfg.patch_size
        n = (x.shape[-2] // p) * (x.shape[-1] // p)
        c = cfg.num_attention_heads * cfg.attention_head_dim
        return torch.empty((x.shape[0], n, c), dtype=self.dtype, device=x.device)

    def _check_filled(self, step: int, plan: StepPlan, caches: CacheSet) -> None:
        for b, bp in enumerate(plan.blocks):
            if bp.reuse_block:
                if ("delta", b) not in caches.filled:
                    raise ScheduleError(f"step {step} reuses block {b} but its residual cache was not filled in this "
                                        f"generation (start at step 0, or call reset())")
                continue
            for i, c in enumerate(bp.compute):
                reads = bp.reads(i)
                if not c and (not reads or any(caches.slot_key(b, i, j) not in caches.filled for j in reads)):
                    raise ScheduleError(
                        f"step {step} reuses {plan.branches[i]} of block {b} but that cache was not filled in this "
                        f"generation (start at step 0, or call reset())")

    @staticmethod
    def _mark_filled(plan: StepPlan, caches: CacheSet, collapsed: bool = False, blocks: range | None = None) -> None:
        """Record what ``plan`` stored (in ``blocks``, default all) as filled for this generation."""
        for b in range(len(plan.blocks)) if blocks is None else blocks:
            bp = plan.blocks[b]
            if bp.store_delta:
                caches.filled.add(("delta", b))
                if collapsed:
                    caches.half_dirty.add(("delta", b))
            for i, s in enumerate(bp.store):
                if s:
                    key = caches.slot_key(b, i, bp.slot[i])  # slots > 0 never at a collapsed step (forecast)
                    caches.filled.add(key)
                    if collapsed and not (plan.attn2_cfg_mean and plan.branches[i] == "attn2"):
                        caches.half_dirty.add(key)

    # ------------------------------------------------------------ CFG collapse
    _PER_SAMPLE_TEXT = ("encoder_hidden_states", "encoder_attention_mask")

    def _can_collapse(self, step: int, args: dict) -> bool:
        """Static: the schedule makes both CFG halves compute the same thing at this step. Run time: the
        halves carry the same latents, timestep and other per-sample inputs (exact comparison)."""
        if not self.collapsible[step] or self._diverged or torch.compiler.is_compiling():
            return False
        x = args["hidden_states"]
        if x.shape[0] % 2:
            return False
        for k, v in args.items():
            if k in self._PER_SAMPLE_TEXT:
                continue
            for t in (v.values() if isinstance(v, dict) else [v]):
                if isinstance(t, torch.Tensor) and t.ndim >= 1 and t.shape[0] == x.shape[0]:
                    h = t.shape[0] // 2
                    if not torch.equal(t[:h], t[h:]):
                        self._diverged = True
                        return False
        return True

    @staticmethod
    def _half_args(args: dict) -> dict:
        """The second (conditional) half of every per-sample tensor argument."""
        b = args["hidden_states"].shape[0]

        def half(v):
            if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == b:
                return v[b // 2:]
            if isinstance(v, dict):
                return {k: half(t) for k, t in v.items()}
            return v

        return {k: half(v) for k, v in args.items()}

    @staticmethod
    def _sync_halves(caches: CacheSet) -> None:
        """Before a full-batch step, copy what collapsed steps wrote (second half) to the first half."""
        for slot in caches.half_dirty:
            buf = caches.delta[slot[1]] if slot[0] == "delta" else caches.branch[slot]
            h = buf.shape[0] // 2
            buf[:h].copy_(buf[h:])
        caches.half_dirty.clear()

    def _run_plan(self, plan: StepPlan, args: dict, caches: CacheSet, collapsed: bool = False) -> torch.Tensor:
        """One transformer call following ``plan`` (eager, captured, or traced by torch.compile).

        ``collapsed``: the call carries one CFG half; per-sample caches are used through their second half.
        """
        from ..adapters.base import StepInputs

        ad, model = self.adapter, self.original_model
        inputs = StepInputs(args=args)
        h, ctx = ad.prepare(model, inputs)
        h = self._run_blocks(plan, h.contiguous(), ctx, caches, 0, ad.num_blocks(model), collapsed)
        return ad.finish(model, h, ctx, inputs)

    def _run_blocks(self, plan: StepPlan, h: torch.Tensor, ctx, caches: CacheSet, start: int, end: int,
                    collapsed: bool = False) -> torch.Tensor:
        """Blocks ``start..end-1`` of ``plan`` on residual stream ``h`` (updated in place and returned)."""
        ad, model = self.adapter, self.original_model
        half = h.shape[0] // 2

        def per_sample(buf):
            return buf[buf.shape[0] // 2:] if collapsed else buf

        blocks = ad.blocks(model)
        for b in range(start, end):
            block, bp = blocks[b], plan.blocks[b]
            if bp.reuse_block:
                ops.gated_residual_(h, per_sample(caches.delta_buffer(b)))
                continue
            inp = h.clone() if bp.store_delta else None
            # a block that computes no branch needs only its gates
            bctx = ad.block_context(block, ctx) if any(bp.compute) else ad.block_gates(block, ctx)
            for i, name in enumerate(plan.branches):
                gate = ad.branch_gate(name, bctx)
                cfg_mean = plan.attn2_cfg_mean and name == "attn2"
                if cfg_mean and h.shape[0] % 2 and not collapsed:
                    raise ValueError(f"this schedule caches cross-attention as the mean of the two classifier-free "
                                     f"guidance halves, which needs an even batch; got batch {h.shape[0]}")
                if bp.compute[i]:
                    y = ad.compute_branch(block, name, h, bctx, ctx)
                    if cfg_mean and bp.store[i]:
                        ops.cfg_mean_store_(h, y, caches.branch_buffer(b, i, half=True))
                    else:
                        ops.gated_residual_(h, y, gate,
                                            per_sample(caches.slot_buffer(b, i, bp.slot[i])) if bp.store[i] else None)
                elif cfg_mean:
                    cache = caches.branch_buffer(b, i, half=True)
                    if collapsed:
                        ops.gated_residual_(h, cache)
                    else:
                        ops.gated_residual_(h[:half], cache)
                        ops.gated_residual_(h[half:], cache)
                else:
                    reads, w = bp.reads(i), bp.weights[i]
                    ys = [per_sample(caches.slot_buffer(b, i, j)) for j in reads]
                    if len(reads) == 1 and w[reads[0]] == 1.0:
                        ops.gated_residual_(h, ys[0], gate)
                    else:  # forecast: h += gate * (sum of weighted last outputs), one pass
                        c = [float(w[j]) for j in reads] + [0.0] * (3 - len(reads))
                        ops.forecast_residual_(h, ys[0], ys[1] if len(ys) > 1 else ys[0],
                                               ys[2] if len(ys) > 2 else None, gate, c[0], c[1], c[2])
            if bp.store_delta:
                ops.residual_delta_store_(per_sample(caches.delta_buffer(b)), h, inp)
        return h

    # ------------------------------------------------------------ pieces for pipeline/data parallel wrappers
    def begin_step(self, args: dict, step: int | None = None) -> tuple[int, CacheSet]:
        """Resolve the step (from the timestep, or ``step``) and the caches for a call with ``args``, as
        ``forward`` does; for wrappers that run the blocks in pieces (e.g. on several devices)."""
        if step is not None:
            self.set_step(step)
        s = self._resolve_step(args.get("timestep"))
        x = args["hidden_states"]
        sig = signature(args)
        if s == 0 or self._gen_sig is None:
            self._gen_sig = sig
        caches = self._cache_set(sig, x)
        if s == 0:
            caches.filled.clear()
        return s, caches

    def run_blocks(self, step: int, h: torch.Tensor, ctx, caches: CacheSet, start: int, end: int) -> torch.Tensor:
        """Run blocks ``start..end-1`` of step ``step``'s plan on ``h`` (in place), eagerly, with the fused ops."""
        plan = self.plans[step]
        with torch.no_grad():
            h = self._run_blocks(plan, h.contiguous(), ctx, caches, start, end)
        self._mark_filled(plan, caches, blocks=range(start, end))
        return h

    def end_step(self, step: int) -> None:
        self._step = step


def compile_schedule(model: nn.Module, schedule: Schedule, *, cuda_graphs: bool | str = "auto",
                     torch_compile: bool | dict = False, cfg_collapse: bool = True) -> CachedTransformer:
    """Turn ``model`` (a supported diffusers transformer) and a static ``schedule`` into a drop-in module.

    ``pipe.transformer = compile_schedule(pipe.transformer, schedule)`` makes the pipeline skip the
    scheduled work. On CUDA each distinct step plan is captured once in a CUDA graph
    (``cuda_graphs=False`` turns that off); ``torch_compile=True`` (or a dict of
    ``torch.compile`` options) compiles each step plan with ``fullgraph=True``. With a T-GATE-style
    schedule (CFG-mean cross-attention cache), steps at which both guidance halves must compute the
    same output run on one half (``cfg_collapse=False`` turns that off).
    """
    model = getattr(model, "original_model", model)
    from ..adapters import BlockLevelAdapter

    if schedule.branches == ["block"] or isinstance(adapter_for(model), BlockLevelAdapter):
        # block level: families without a branch adapter (Flux, SD3, Wan, ...), or a ["block"] schedule
        from .block_runtime import compile_blocks

        if torch_compile:
            raise NotImplementedError("torch_compile is not available for block-level schedules yet")
        return compile_blocks(model, schedule)
    return CachedTransformer(model, schedule, cuda_graphs=cuda_graphs, torch_compile=torch_compile,
                             cfg_collapse=cfg_collapse)
