"""torch.compile at block level (Flux, SD3): one graph per kind of block work (compute / compute-and-store /
reuse / forecast, per block structure and input layout), shared by every block and step, so the number of graphs
does not grow with the schedule's distinct step plans; no graph break; outputs equal the eager block runtime
and the original model."""
from __future__ import annotations

import functools

import pytest
import torch
from torch._dynamo.utils import counters

import l2c_kernels as l2c
from l2c_kernels.runtime.cached_transformer import compile_blocks
from tests.families.block_reference import HookBlockReference
from tests.families.conftest import TIMESTEPS, generate, max_err
from tests.family_configs import FAMILIES, init_weights

LONG = [1000, 900, 800, 700, 600, 500, 400, 300, 200, 100]


class CountingBackend:
    """A torch.compile backend that counts compilations and runs the traced graph (``inner``: another backend,
    e.g. ``"aot_eager"``, which functionalizes the in-place cache ops as inductor would see them)."""

    def __init__(self, inner=None):
        self.graphs, self.inner = 0, inner

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        if self.inner is None:
            return gm.forward
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(self.inner)(gm, example_inputs)


@functools.lru_cache(maxsize=None)
def model_for(name: str):
    """flux-dev (2 double + 2 single blocks) as published-but-shrunk; SD3 medium with 4 blocks (the last keeps
    ``context_pre_only``), so that a schedule can have many more distinct step plans than block kinds."""
    fam = FAMILIES[name]
    if name == "sd3-medium":
        import diffusers

        return init_weights(diffusers.SD3Transformer2DModel(**dict(fam.config, num_layers=4)), 0)
    return fam.build(seed=0)


@pytest.fixture(autouse=True)
def fresh_dynamo(one_thread):  # one_thread: tests/conftest.py
    torch._dynamo.reset()
    counters.clear()


def num_blocks(model) -> int:
    return l2c.Schedule.full(model, TIMESTEPS, branches=["block"]).num_blocks


def staggered(model, forecast="linear"):
    """Blocks computing on shifted cycles (a different set of blocks reused at almost every step)."""
    nb = num_blocks(model)
    mask = [[s == 0 or (s + b) % 3 == 0 or (s * 7 + b) % 5 == 0 for b in range(nb)] for s in range(len(LONG))]
    return l2c.Schedule.from_mask(model, LONG, mask, branches=["block"], forecast=forecast)


def scale_of(outs) -> float:
    return max(1.0, max(float(o.abs().max()) for o in outs))


@pytest.mark.parametrize("name", ["flux-dev", "sd3-medium"])
def test_graphs_bounded_by_block_kinds_not_step_plans(name):
    fam, model = FAMILIES[name], model_for(name)
    sched = staggered(model)
    backend = CountingBackend()
    fast = compile_blocks(model, sched, torch_compile=dict(backend=backend))
    eager = compile_blocks(model, sched)
    assert fast.distinct_plans() >= 8
    per_gen = []
    for gen in range(2):
        got = generate(lambda s, kw: fast(**kw), fam, timesteps=LONG)
        want = generate(lambda s, kw: eager(**kw), fam, timesteps=LONG)
        # compute and plain reuse run the same ops as eager; a forecast is x + w0*r0 + w1*r1 as two rounded adds
        # (the compiler's form) against one fused pass: a few float32 ulps of the output's magnitude
        assert max_err(got, want) <= 1e-5 * scale_of(want), gen
        per_gen.append(backend.graphs)
    assert per_gen[0] == per_gen[1]                        # the second generation compiles nothing
    assert backend.graphs == fast.compiled_variants()      # the module's own count of (structure, kind, layout)
    assert backend.graphs < fast.distinct_plans()
    kinds = {k[1] for k in fast._state.kinds_run}
    assert {(k.compute, k.store, k.reads) for k in kinds} == {(True, False, 0), (True, True, 0), (False, False, 1),
                                                               (False, False, 2)}
    assert not counters["graph_break"]
    assert fast.summary()["compiled_variants"] == backend.graphs


@pytest.mark.parametrize("name", ["flux-dev", "sd3-medium"])
def test_all_compute_under_compile_equals_original(name):
    fam, model = FAMILIES[name], model_for(name)
    sched = l2c.Schedule.full(model, TIMESTEPS, branches=["block"])
    fast = compile_blocks(model, sched, torch_compile=dict(backend=CountingBackend("aot_eager")))
    ref = generate(lambda s, kw: model(**kw), fam)
    for _ in range(2):  # the first call of each block runs eagerly (the pattern checks); the second generation is
        got = generate(lambda s, kw: fast(**kw), fam)  # compiled throughout
        assert max_err(ref, got) <= 1e-5 * scale_of(ref)


@pytest.mark.parametrize("name", ["flux-dev", "sd3-medium"])
def test_half_reuse_under_compile_equals_eager_and_hook_reference(name):
    from tests.families.test_block_families import half_reuse_mask

    fam, model = FAMILIES[name], model_for(name)
    sched = l2c.Schedule.from_mask(model, TIMESTEPS, half_reuse_mask(num_blocks(model)), branches=["block"])
    backend = CountingBackend("aot_eager")
    fast = compile_blocks(model, sched, torch_compile=dict(backend=backend))
    eager = compile_blocks(model, sched)
    want = generate(lambda s, kw: eager(**kw), fam)
    ref = generate(HookBlockReference(model, fam, sched).step, fam)
    per_gen = []
    for _ in range(2):
        got = generate(lambda s, kw: fast(**kw), fam)
        # the same fused residual ops on the same inputs: equal up to float32 rounding of the traced blocks
        assert max_err(want, got) <= 1e-5 * scale_of(want)
        assert max_err(ref, got) <= 1e-5 * scale_of(ref)
        per_gen.append(backend.graphs)
    assert per_gen[0] == per_gen[1]  # step 0's kinds compile in the first generation too (after the eager check)
    assert max_err(generate(lambda s, kw: model(**kw), fam), got) > 1e-3  # the reuse changed the output
    assert backend.graphs == fast.compiled_variants() and not counters["graph_break"]


def test_summary_counts_block_flops_removed_and_plans():
    fam, model = FAMILIES["flux-dev"], model_for("flux-dev")
    flops = [4.0, 4.0, 1.0, 1.0]  # e.g. counted: double blocks cost more than single ones
    mask = [[True] * 4, [False, True, True, False], [True] * 4, [True, False, True, True], [True] * 4]
    sched = l2c.Schedule.from_mask(model, TIMESTEPS, mask, branches=["block"], unit_flops=flops)
    fast = compile_blocks(model, sched)
    generate(lambda s, kw: fast(**kw), fam, timesteps=TIMESTEPS[:3])  # a generation stopped after 3 steps
    sm = l2c.summary(fast)
    assert sm["level"] == "block" and sm["steps_run"] == 3 and sm["generations"] == 0
    assert sm["block_flops_removed"] == pytest.approx((4 + 1) / (3 * 10), abs=1e-4)  # removed / run, by cost
    # plans: 0 computes all and stores blocks 0 and 3, 1 reuses them, 2 computes all and stores block 1, 3 reuses
    # it, 4 computes all and stores nothing
    assert sm["plans_used"] == 3 and sm["distinct_plans"] == 5
    fast.set_step(3)
    generate(lambda s, kw: fast(**kw), fam, timesteps=TIMESTEPS[3:])
    sm = l2c.summary(fast)
    assert sm["generations"] == 1 and sm["steps_run"] == 5 and sm["plans_used"] == 5
    assert sm["block_flops_removed"] == pytest.approx(sched.flops_removed_fraction(), abs=1e-4)
    assert sm["compiled_variants"] is None and sm["cuda_graphs"] == 0


def test_no_host_sync_after_the_first_generation(monkeypatch):
    """With the timestep unread (what a GPU run does), the block path reads no tensor on the host once every block's
    pattern was checked (its first call): no .item(), torch.equal, bool() of a tensor ... from l2c_kernels code."""
    from tests.runtime.test_host_path import SyncCounter

    fam, model = FAMILIES["flux-dev"], model_for("flux-dev")
    mask = [[s in (0, 1, 3) or b == 0 for b in range(num_blocks(model))] for s in range(len(TIMESTEPS))]
    sched = l2c.Schedule.from_mask(model, TIMESTEPS, mask, branches=["block"], forecast="quadratic")
    fast = compile_blocks(model, sched, timestep_check="off")
    generate(lambda s, kw: fast(**kw), fam)
    counter = SyncCounter(monkeypatch)
    generate(lambda s, kw: fast(**kw), fam)
    assert counter.calls == []
    assert fast.summary()["generations"] == 2
