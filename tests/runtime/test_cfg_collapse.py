"""T-GATE CFG collapse: after the gate, identical CFG halves run as one half, exactly."""
from __future__ import annotations


import l2c_kernels as l2c
from l2c_kernels import schedules
from l2c_kernels.runtime.plan import collapsible_steps
from tests.runtime.test_compile_schedule import run_steps
from tests.tiny_models import cfg_batch, pixart_inputs, rel_err, tiny_pixart

TS = [951, 851, 751, 651, 551, 451, 351, 251, 151, 51]


def test_collapsible_steps_follow_the_gate_and_cache_ages():
    m = tiny_pixart(layers=2)
    s = schedules.tgate(m, TS, gate_step=4, sp_interval=2, fi_interval=1, warm_up=1)
    assert collapsible_steps(s) == [False] * 4 + [True] * 6
    # attn1 reused right after the gate reads a cache from before it: that step cannot collapse
    s2 = schedules.tgate(m, TS, gate_step=5, sp_interval=2, fi_interval=2, warm_up=1)
    flags = collapsible_steps(s2)
    assert flags[:6] == [False] * 6 and flags[6] and flags[7]
    assert not any(collapsible_steps(schedules.uniform(m, TS, 2)))
    # an extrapolated output mixes caches of different ages: never collapsed
    assert not any(collapsible_steps(l2c.Schedule.from_dict(dict(s.to_dict(), forecast="linear"))))


def test_collapse_equals_uncollapsed_run():
    m = tiny_pixart(layers=3)
    sched = schedules.tgate(m, TS, gate_step=4, sp_interval=2, fi_interval=2, warm_up=1)
    inputs = cfg_batch(pixart_inputs(batch=4))
    on = l2c.compile_schedule(m, sched)
    off = l2c.compile_schedule(m, sched, cfg_collapse=False)
    a, b = run_steps(on, sched, inputs), run_steps(off, sched, inputs)
    assert on.collapsed_calls == sum(collapsible_steps(sched)) > 0 and off.collapsed_calls == 0
    for s, (x, y) in enumerate(zip(a, b)):
        assert rel_err(x, y) < 1e-5, f"step {s}"
    # the uncollapsed run really gives identical halves at those steps
    for s in range(len(TS)):
        if collapsible_steps(sched)[s]:
            assert rel_err(b[s][:2], b[s][2:]) < 1e-6


def test_never_collapsed_when_halves_differ():
    m = tiny_pixart(layers=2)
    sched = schedules.tgate(m, TS, gate_step=3, sp_interval=1, fi_interval=1, warm_up=1)
    inputs = pixart_inputs(batch=4)  # different latents in each half (img2img-like)
    fast = l2c.compile_schedule(m, sched)
    got = run_steps(fast, sched, inputs)
    ref = run_steps(l2c.compile_schedule(m, sched, cfg_collapse=False), sched, inputs)
    assert fast.collapsed_calls == 0
    assert all(rel_err(x, y) < 1e-6 for x, y in zip(got, ref))


def test_collapse_then_full_step_syncs_caches():
    """A schedule that computes cross-attention again after collapsed steps runs those full-batch,
    reading caches the collapsed steps wrote."""
    m = tiny_pixart(layers=2)
    base = schedules.tgate(m, TS, gate_step=3, sp_interval=1, fi_interval=3, warm_up=1)
    plan = [list(r) for r in base.plan]
    plan[8] = ["CCC", "CCC"]  # recompute everything once more late
    sched = l2c.Schedule(timesteps=TS, plan=plan, branches=base.branches, num_blocks=2, attn2_cache="cfg_mean")
    inputs = cfg_batch(pixart_inputs(batch=2))
    on, off = l2c.compile_schedule(m, sched), l2c.compile_schedule(m, sched, cfg_collapse=False)
    a, b = run_steps(on, sched, inputs), run_steps(off, sched, inputs)
    assert on.collapsed_calls > 0
    assert all(rel_err(x, y) < 1e-5 for x, y in zip(a, b))
