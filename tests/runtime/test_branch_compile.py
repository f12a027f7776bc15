"""torch.compile at two-stream branch level (SD3 / SD3.5 / Flux.1 units): one graph per (block structure, unit kind,
input layout) -- which units compute, store, reuse or forecast --, shared by the blocks and steps that run it (the
forecast weights are graph inputs); nothing compiled after the first generation; no graph break; outputs equal the
eager branch-level runtime and the hook-based reference of the schedule."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import l2c_kernels as l2c
from l2c_kernels.adapters.mmdit_branches import branch_names
from l2c_kernels.runtime.cached_transformer import compile_blocks
from tests.families.conftest import generate, max_err
from tests.family_configs import FAMILIES
from tests.mmdit_branches.hook_reference import HookBranchReference
from tests.runtime.test_block_compile import LONG, CountingBackend, model_for, scale_of  # model_for: Flux.1-dev, SD3
# medium with 4 blocks (the last keeps ``context_pre_only``: no text stream out of its attention, no ff_context)


@pytest.fixture(autouse=True)
def fresh_dynamo(one_thread):  # one_thread: tests/conftest.py
    torch._dynamo.reset()
    counters.clear()


def staggered(model, forecast: str):
    """Units computing on shifted cycles: a different set of units reused (or forecast) at almost every step."""
    names = branch_names(model)
    nb = l2c.Schedule.full(model, LONG[:2], branches=names).num_blocks
    mask = [[[s == 0 or (s + b + u) % 3 == 0 or (s * 7 + b) % 5 == 0 for u in range(len(names))] for b in range(nb)]
            for s in range(len(LONG))]
    return l2c.Schedule.from_mask(model, LONG, mask, branches=names, forecast=forecast)


@pytest.mark.parametrize("name", ["flux-dev", "sd3.5-medium", "sd3-medium"])
@pytest.mark.parametrize("forecast", ["none", "linear"])
def test_graphs_bounded_by_unit_kinds_and_equal_to_eager(name, forecast):
    fam, model = FAMILIES[name], model_for(name)
    sched = staggered(model, forecast)
    backend = CountingBackend("aot_eager")   # functionalizes the in-place cache ops as inductor sees them
    fast = compile_blocks(model, sched, torch_compile=dict(backend=backend))
    eager = compile_blocks(model, sched)
    assert type(fast).__name__ == "BranchCachedTransformer"
    ref = generate(HookBranchReference(model, sched).step, fam, timesteps=LONG)
    want = generate(lambda s, kw: eager(**kw), fam, timesteps=LONG)
    per_gen = []
    for gen in range(2):
        got = generate(lambda s, kw: fast(**kw), fam, timesteps=LONG)
        # computed units and plain reuses run the same ops on the same inputs as eager (float32 rounding of the
        # traced blocks); a forecast is x + gate * (w0 r0 + w1 r1) as rounded tensor ops against one fused pass in
        # float32: a few ulps of the output's magnitude either way
        assert max_err(got, want) <= 1e-5 * scale_of(want), gen
        assert max_err(got, ref) <= 1e-5 * scale_of(ref), gen
        per_gen.append(backend.graphs)
    assert per_gen[0] == per_gen[1]                     # the second generation compiles nothing
    assert backend.graphs == fast.compiled_variants()   # the module's own count of (structure, kind, layout)
    assert not counters["graph_break"]
    kinds = {k[1] for k in fast._state.kinds_run}
    assert any(1 in k.reads for k in kinds) and any(all(k.compute) for k in kinds)
    assert any(r >= 2 for k in kinds for r in k.reads) == (forecast != "none")
    assert fast.summary()["level"] == "branch" and fast.summary()["compiled_variants"] == backend.graphs


def test_blocks_and_steps_share_graphs():
    """Every block on the same per-unit cycles (unit u computes every u + 2 steps): the blocks of one class run the
    same kinds, so the graphs are the distinct (block class, unit kind, layout), fewer than the (block, block plan)
    pairs a per-block compile would make."""
    fam, model = FAMILIES["flux-dev"], model_for("flux-dev")
    names = branch_names(model)
    nb = l2c.Schedule.full(model, LONG[:2], branches=names).num_blocks
    mask = [[[s == 0 or s % (u + 2) == 0 for u in range(len(names))] for _ in range(nb)] for s in range(len(LONG))]
    sched = l2c.Schedule.from_mask(model, LONG, mask, branches=names, forecast="linear")
    backend = CountingBackend()
    fast = compile_blocks(model, sched, torch_compile=dict(backend=backend))
    eager = compile_blocks(model, sched)
    got = generate(lambda s, kw: fast(**kw), fam, timesteps=LONG)
    want = generate(lambda s, kw: eager(**kw), fam, timesteps=LONG)
    assert max_err(got, want) <= 1e-5 * scale_of(want)
    pairs = {(r.index, row[r.index]) for row in fast._actions for r in fast._state.refs}
    assert backend.graphs == fast.compiled_variants() < len(pairs)
    assert not counters["graph_break"]


def test_compile_refuses_a_missing_cache_like_eager():
    """A step that reuses a unit whose cache this generation did not fill is refused before anything runs, with
    the eager path's message."""
    fam, model = FAMILIES["flux-dev"], model_for("flux-dev")
    fast = compile_blocks(model, staggered(model, "none"), torch_compile=dict(backend="eager"))
    fast.set_step(1)
    with pytest.raises(l2c.ScheduleError, match="cache was not filled in this generation"):
        fast(**fam.call_kwargs(fam.latents(1, 0), LONG[1], fam.inputs(1, 0)))
