"""Compile a :class:`~l2c_kernels.Schedule` into per-step execution plans.

Because the schedule is static, the runtime knows before sampling which cache writes are ever
read: a branch output is stored only when a later step reuses it before recomputing it, and a
block residual only when a later step reuses the whole block. With a forecast, a branch keeps its
last ``order + 1`` outputs in a ring of buffers (the k-th computation of a generation writes slot
``k % (order + 1)``), and every reuse is a weighted sum of slots whose Lagrange weights are fixed
here. Steps with the same plan share one plan object (and, on GPU, one CUDA graph).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..schedule import BLOCK, COMPUTE, REUSE, Schedule


@dataclass(frozen=True)
class BlockPlan:
    reuse_block: bool            # skip the block, add its cached residual
    compute: tuple[bool, ...]    # per branch: compute (True) or reuse the cached raw output
    store: tuple[bool, ...]      # per branch: write the raw output to its cache slot (only if computed)
    store_delta: bool            # write the block residual (out - in) to the block cache
    # per branch: the cache slot a computed output is written to (0 without a forecast), and for a
    # reused branch the weight of each slot (reused output = sum_j weights[j] * slot j; a plain
    # reuse is weight 1 on one slot)
    slot: tuple[int, ...] = ()
    weights: tuple[tuple[float, ...], ...] = ()

    def reads(self, i: int) -> tuple[int, ...]:
        """The slots a reuse of branch ``i`` reads."""
        return tuple(j for j, w in enumerate(self.weights[i]) if w)


@dataclass(frozen=True)
class StepPlan:
    blocks: tuple[BlockPlan, ...]
    branches: tuple[str, ...]
    attn2_cfg_mean: bool

    @property
    def key(self) -> tuple:
        return (self.blocks, self.branches, self.attn2_cfg_mean)

    def reused_fraction(self) -> float:
        n = sum(len(b.compute) for b in self.blocks)
        done = sum(0 if b.reuse_block else sum(b.compute) for b in self.blocks)
        return 1.0 - done / max(1, n)


def compile_plans(schedule: Schedule) -> list[StepPlan]:
    """One :class:`StepPlan` per step, identical plans interned to one object."""
    nsteps, nblocks, nbr = schedule.num_steps, schedule.num_blocks, len(schedule.branches)
    plan = schedule.plan
    cfg_mean_branch = (schedule.branches.index("attn2") if schedule.attn2_cache == "cfg_mean"
                       and "attn2" in schedule.branches else None)

    def block_reused_next(s: int, b: int) -> bool:
        """The next step skips block ``b`` and re-adds the residual this step stores."""
        return s + 1 < nsteps and plan[s + 1][b] == BLOCK

    # per (block, branch): what each step does with the branch cache
    def grid(v):
        return [[[v] * nbr for _ in range(nblocks)] for _ in range(nsteps)]

    max_order = {"none": 0, "linear": 1, "quadratic": 2, "taylor": 2}[schedule.forecast]
    extrapolate = _taylor if schedule.forecast == "taylor" else _lagrange
    nslots = max_order + 1
    store, slot = grid(False), grid(0)
    weights = grid((0.0,) * nslots)
    for b in range(nblocks):
        for i in range(nbr):
            ring = 1 if i == cfg_mean_branch else nslots  # the CFG-mean cache is one half-batch buffer
            computed = [s for s in range(nsteps) if plan[s][b] != BLOCK and plan[s][b][i] == COMPUTE]
            for k, s0 in enumerate(computed):
                slot[s0][b][i] = k % ring
                end = computed[k + 1] if k + 1 < len(computed) else nsteps
                reuses = [s for s in range(s0 + 1, end) if plan[s][b] != BLOCK and plan[s][b][i] == REUSE]
                if not reuses:
                    continue
                order = min(k, ring - 1)  # as many earlier outputs as this generation has
                nodes = computed[k - order:k + 1]
                for n in nodes:
                    store[n][b][i] = True
                for s in reuses:
                    w = [0.0] * nslots
                    for kk, wn in zip(range(k - order, k + 1), extrapolate(s, nodes)):
                        w[kk % ring] = wn
                    weights[s][b][i] = tuple(w)

    interned: dict[tuple, StepPlan] = {}
    out = []
    for s in range(nsteps):
        blocks = []
        for b in range(nblocks):
            e = plan[s][b]
            if e == BLOCK:
                no = (False,) * nbr
                blocks.append(BlockPlan(True, no, no, False, (0,) * nbr, ((0.0,) * nslots,) * nbr))
                continue
            compute = tuple(c == COMPUTE for c in e)
            blocks.append(BlockPlan(False, compute, tuple(store[s][b]), block_reused_next(s, b),
                                    tuple(slot[s][b]), tuple(weights[s][b])))
        sp = StepPlan(tuple(blocks), tuple(schedule.branches), schedule.attn2_cache == "cfg_mean")
        out.append(interned.setdefault(sp.key, sp))
    return out


def _lagrange(s: int, nodes: list[int]) -> list[float]:
    """Weights ``w`` with ``p(s) = sum_j w[j] * y(nodes[j])``, ``p`` the polynomial through the outputs at
    ``nodes`` (one node: constant, two: linear, three: quadratic)."""
    out = []
    for j, sj in enumerate(nodes):
        w = 1.0
        for m, sm in enumerate(nodes):
            if m != j:
                w *= (s - sm) / (sj - sm)
        out.append(w)
    return out


def _taylor(s: int, nodes: list[int]) -> list[float]:
    """Weights ``w`` of the second-order Taylor forecast TaylorSeer makes from the outputs at ``nodes``
    (``n0 < n1 < n2``, the last the newest): backward differences per step, ``d1 = (y2 - y1) / D``,
    ``d2 = (d1 - (y1 - y0) / D') / D`` with ``D = n2 - n1``, ``D' = n1 - n0``, and
    ``y(s) = y2 + h d1 + h^2 / 2 d2`` at ``h = s - n2``. It bends less than the parabola through the three
    outputs (``h^2 / 2`` where the parabola has ``h (h + D) / 2`` per ``D^2``). With fewer nodes: constant or linear."""
    if len(nodes) < 3:
        return _lagrange(s, nodes)
    n0, n1, n2 = nodes
    h, d, dp = s - n2, n2 - n1, n1 - n0
    c = h * h / 2.0
    return [c / (d * dp), -h / d - c / (d * d) - c / (d * dp), 1.0 + h / d + c / (d * d)]


def collapsible_steps(schedule: Schedule) -> list[bool]:
    """Steps at which both classifier-free-guidance halves are guaranteed to compute the same output.

    True where every block reuses the CFG-mean cross-attention cache (so the caption no longer enters
    the computation) and every other cache read at that step was written at such a step (so it is
    identical across the halves too). Given identical latents and timesteps in both halves, the
    transformer can then run on one half and return it for both (T-GATE's CFG collapse).
    """
    if schedule.attn2_cache != "cfg_mean" or "attn2" not in schedule.branches or schedule.forecast != "none":
        # (an extrapolated output mixes caches written at different steps: no collapse is proven for it)
        return [False] * schedule.num_steps
    a2 = schedule.branches.index("attn2")
    nbr = len(schedule.branches)
    written_ident: dict = {}  # (block, branch) or ("delta", block) -> was the last write at an identical step
    out = []
    for row in schedule.plan:
        ident = True
        for b, e in enumerate(row):
            if e == BLOCK:
                ident &= written_ident.get(("delta", b), False)
                continue
            ident &= e[a2] == REUSE
            for i in range(nbr):
                if i != a2 and e[i] == REUSE:
                    ident &= written_ident.get((b, i), False)
        for b, e in enumerate(row):
            if e == BLOCK:
                continue
            written_ident[("delta", b)] = ident
            for i in range(nbr):
                if e[i] == COMPUTE:
                    written_ident[(b, i)] = ident
        out.append(ident)
    return out


def slot_key(block: int, branch: int, slot: int) -> tuple:
    """The cache key of a branch's ring slot (slot 0 shares the plain branch cache's key)."""
    return (block, branch) if slot == 0 else ("slot", block, branch, slot)


def cache_reads_writes(plan: StepPlan) -> tuple[frozenset, frozenset]:
    """The cache keys step ``plan`` reads and writes: ``(block, branch)`` for slot 0 of a branch (and the
    CFG-mean cache), ``("slot", block, branch, k)`` for ring slot ``k > 0``, ``("delta", block)`` for a block
    residual (the keys of :func:`slot_key`)."""
    reads, writes = set(), set()
    for b, bp in enumerate(plan.blocks):
        if bp.reuse_block:
            reads.add(("delta", b))
            continue
        if bp.store_delta:
            writes.add(("delta", b))
        for i, name in enumerate(plan.branches):
            cfg_mean = plan.attn2_cfg_mean and name == "attn2"
            if bp.compute[i]:
                if bp.store[i]:
                    writes.add(slot_key(b, i, 0 if cfg_mean else bp.slot[i]))
            elif cfg_mean:
                reads.add(slot_key(b, i, 0))
            else:
                reads.update(slot_key(b, i, j) for j in bp.reads(i))
    return frozenset(reads), frozenset(writes)


@dataclass(frozen=True)
class StepEntry:
    """Everything the runtime needs at one step, derived once from the schedule (the per-step lookup)."""

    index: int
    plan: StepPlan
    collapsible: bool                 # both CFG halves compute the same output (given identical inputs)
    needs: frozenset                  # earlier steps whose cache writes this step reads
    half_writes: tuple                # per-sample caches written (second half only when collapsed)


def step_table(schedule: Schedule, plans: list[StepPlan], collapsible: list[bool]) -> tuple[StepEntry, ...]:
    """One :class:`StepEntry` per step. ``needs`` lets a run that jumps between steps (``set_step``) be
    checked; a generation run in order from step 0 is correct by construction (the schedule validator
    rejects every reuse of a cache that no earlier step fills), so in-order steps check nothing."""
    last_writer: dict = {}
    out = []
    for s, plan in enumerate(plans):
        reads, writes = cache_reads_writes(plan)
        needs = frozenset(last_writer[k] for k in reads if k in last_writer)
        cfg_mean_keys = {k for k in writes if plan.attn2_cfg_mean and len(k) == 2 and k[0] != "delta"
                         and plan.branches[k[1]] == "attn2"}
        out.append(StepEntry(s, plan, collapsible[s], needs, tuple(sorted(writes - cfg_mean_keys, key=repr))))
        for k in writes:
            last_writer[k] = s
    return tuple(out)
