"""Baseline schedules: shapes, budgets and the rules they follow."""
from __future__ import annotations

import pytest

from l2c_kernels import schedules
from tests.tiny_models import tiny_dit, tiny_pixart

TS = list(range(950, 0, -50))  # 19 steps


def test_uniform_and_deepcache():
    m = tiny_dit(layers=4)
    u = schedules.uniform(m, TS, interval=3)
    assert [row[0] for row in u.plan[:4]] == ["CC", "RR", "RR", "CC"]
    assert u.removed_fraction() == pytest.approx(12 / 19)
    d = schedules.deepcache(m, TS, interval=2, keep_first=1, keep_last=1)
    assert d.plan[1] == ["CC", "B", "B", "CC"] and d.plan[2] == ["CC"] * 4
    f = schedules.first_blocks(m, TS, keep_first=2, interval=2)
    assert f.plan[1] == ["CC", "CC", "RR", "RR"]
    with pytest.raises(ValueError, match=r"keep_first \+ keep_last must be within 0\.\.4"):
        schedules.deepcache(m, TS, keep_first=3, keep_last=2)


def test_tgate_follows_gate_and_intervals():
    m = tiny_pixart(layers=2)
    s = schedules.tgate(m, TS[:10], gate_step=6, sp_interval=3, fi_interval=2, warm_up=2)
    assert s.branches == ["attn1", "attn2", "ff"] and s.attn2_cache == "cfg_mean"
    col = [row[0] for row in s.plan]
    assert [c[1] for c in col] == list("CCCCCCRRRR")   # attn2: computed at the gate_step steps before the gate
    # attn1 (as the authors' package): steps <= warm_up, i % 3 == 0 and the step before the gate; i % 2 == 0 after
    assert [c[0] for c in col] == list("CCCCRCCRCR")
    assert all(c[2] == "C" for c in col)
    with pytest.raises(ValueError, match="cross-attention"):
        schedules.tgate(tiny_dit(), TS, gate_step=5)
    with pytest.raises(ValueError, match="gate_step"):
        schedules.tgate(m, TS[:10], gate_step=11)
    with pytest.raises(ValueError, match="gate_step"):
        schedules.tgate(m, TS[:10], gate_step=0)


@pytest.mark.parametrize("budget", [0.2, 0.5, 0.7])
def test_random_and_block_caching_meet_budget(budget):
    import random

    m = tiny_pixart(layers=3)
    r = schedules.random_schedule(m, TS, budget, seed=3)
    assert r.flops_removed_fraction() >= budget
    rng = random.Random(0)
    curves = [[[rng.random() * 0.2 for _ in range(3)] for _ in range(3)] for _ in TS]
    b = schedules.block_caching(m, TS, curves, budget)
    assert b.flops_removed_fraction() >= budget - 0.02
    assert all(c == "C" for e in b.plan[0] for c in e)
    with pytest.raises(ValueError, match="budget"):
        schedules.random_schedule(m, TS, 1.2)
