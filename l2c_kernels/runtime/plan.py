"""Compile a :class:`~l2c_kernels.Schedule` into per-step execution plans.

Because the schedule is static, the runtime knows before sampling which cache writes are ever
read: a branch output is stored only when a later step reuses it before recomputing it, and a
block residual only when a later step reuses the whole block. With a forecast the
extrapolation coefficients of every reuse are fixed here too, and the differences of the last
outputs are stored only where a later reuse extrapolates with them. Steps with the same plan share
one plan object (and, on GPU, one CUDA graph).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..schedule import BLOCK, COMPUTE, REUSE, Schedule


@dataclass(frozen=True)
class BlockPlan:
    reuse_block: bool            # skip the block, add its cached residual
    compute: tuple[bool, ...]    # per branch: compute (True) or reuse the cached raw output
    store: tuple[bool, ...]      # per branch: write the raw output to the cache (only if computed)
    store_delta: bool            # write the block residual (out - in) to the block cache
    # forecasts: per branch, the reuse coefficients (reused output = cache + coef * diff + coef2 * diff2;
    # 0: not used) and what a computing step writes before storing its fresh output: diff2 <- diff
    # (store_diff2, first), then diff <- fresh - cache (store_diff)
    coef: tuple[float, ...] = ()
    store_diff: tuple[bool, ...] = ()
    coef2: tuple[float, ...] = ()
    store_diff2: tuple[bool, ...] = ()


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

    coef, coef2, store, store_diff, store_diff2 = grid(0.0), grid(0.0), grid(False), grid(False), grid(False)
    max_order = {"none": 0, "linear": 1, "quadratic": 2}[schedule.forecast]
    for b in range(nblocks):
        for i in range(nbr):
            computed = [s for s in range(nsteps) if plan[s][b] != BLOCK and plan[s][b][i] == COMPUTE]
            for k, s0 in enumerate(computed):
                end = computed[k + 1] if k + 1 < len(computed) else nsteps
                reuses = [s for s in range(s0 + 1, end) if plan[s][b] != BLOCK and plan[s][b][i] == REUSE]
                if not reuses:
                    continue
                store[s0][b][i] = True
                order = 0 if i == cfg_mean_branch else min(k, max_order)  # as many earlier outputs as exist
                if order >= 1:  # diff = y0 - y1 formed at s0 from the output stored at s1
                    s1 = computed[k - 1]
                    store_diff[s0][b][i] = store[s1][b][i] = True
                if order == 2:  # diff2 = y1 - y2: the diff formed at s1, kept aside at s0
                    s2 = computed[k - 2]
                    store_diff2[s0][b][i] = store_diff[s1][b][i] = store[s2][b][i] = True
                for s in reuses:
                    coef[s][b][i], coef2[s][b][i] = _newton(s, computed[max(0, k - order):k + 1][::-1])

    interned: dict[tuple, StepPlan] = {}
    out = []
    for s in range(nsteps):
        blocks = []
        for b in range(nblocks):
            e = plan[s][b]
            if e == BLOCK:
                no, zero = (False,) * nbr, (0.0,) * nbr
                blocks.append(BlockPlan(True, no, no, False, zero, no, zero, no))
                continue
            compute = tuple(c == COMPUTE for c in e)
            blocks.append(BlockPlan(False, compute, tuple(store[s][b]), block_reused_next(s, b),
                                    tuple(coef[s][b]), tuple(store_diff[s][b]),
                                    tuple(coef2[s][b]), tuple(store_diff2[s][b])))
        sp = StepPlan(tuple(blocks), tuple(schedule.branches), schedule.attn2_cache == "cfg_mean")
        out.append(interned.setdefault(sp.key, sp))
    return out


def _newton(s: int, nodes: list[int]) -> tuple[float, float]:
    """Coefficients ``(a, b)`` with ``p(s) = y0 + a (y0 - y1) + b (y1 - y2)``, ``p`` the polynomial through
    the outputs at ``nodes = [s0, s1, s2]`` (latest first; one or two nodes: constant or linear)."""
    if len(nodes) == 1:
        return 0.0, 0.0
    s0, s1 = nodes[0], nodes[1]
    h0 = s0 - s1
    a = (s - s0) / h0
    if len(nodes) == 2:
        return a, 0.0
    s2 = nodes[2]
    h1 = s1 - s2
    w = (s - s0) * (s - s1) / (s0 - s2)  # times the second divided difference (d01 / h0 - d12 / h1)
    return a + w / h0, -w / h1


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
