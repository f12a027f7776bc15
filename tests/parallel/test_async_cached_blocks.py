"""AsyncDenoiser on compile_schedule's block-level and SD3 / Flux branch-level modules: every component follows the
cache schedule on its own rank's caches.

Checked against the independent references composed: the plain-PyTorch AsyncDiff reference of
``test_async_mmdit.py`` (it calls the model's embedders, blocks and output layers itself) with the hook references of
the schedules installed on the blocks it calls (``tests/families/block_reference.py`` for block-level schedules,
``tests/mmdit_branches/hook_reference.py`` for units): each block's cache is filled and read along the asynchronous
trajectory, by the one component that runs it after the warm-up. Nothing of ``l2c_kernels.parallel`` or the runtime
is used by the references.
"""
from __future__ import annotations

import pytest
import torch

import l2c_kernels as l2c
from l2c_kernels import parallel
from tests.families.block_reference import HookBlockReference
from tests.family_configs import FAMILIES
from tests.mmdit_branches.hook_reference import HookBranchReference
from tests.parallel.test_async_mmdit import (AsyncMMDiTReference, cache_schedule, fp32_atol, model_timesteps,
                                             sample, sampler_timesteps, transformer_of)

SPEC = dict(N=2, warm_up=2, steps=7, batch=2)


class CachedAsyncReference(AsyncMMDiTReference):
    """The AsyncDiff reference (stride 1) with a schedule's hook reference installed on the blocks at every step."""

    def __init__(self, model, ranges, timesteps, warm_up: int, hook_ref):
        super().__init__(model, ranges, timesteps, warm_up)
        self.hook_ref = hook_ref

    def forward(self, hidden_states, timestep, return_dict: bool = True, **kw):
        handles = self.hook_ref.hooks(self.calls % len(self.timesteps))
        try:
            return super().forward(hidden_states, timestep, return_dict, **kw)
        finally:
            for h in handles:
                h.remove()


def hook_reference(model, family, sched):
    return HookBlockReference(model, family, sched) if sched.is_block_level else HookBranchReference(model, sched)


@pytest.mark.parametrize("level", ["block", "branch"])
@pytest.mark.parametrize("name", ["flux-dev", "sd3-medium"])
def test_cached_components_match_the_composed_references(name, level, one_thread):
    spec = dict(SPEC, model=name)
    model = transformer_of(spec)
    sched = cache_schedule(model, level, spec["steps"])
    cached = l2c.compile_schedule(model, sched, cuda_graphs=False)
    ad = parallel.AsyncDenoiser(cached, num_components=2, warm_up=spec["warm_up"], emulate=True, balance="uniform")
    got = sample(spec, ad)
    # each emulated rank ran its part of every step: the warm-up whole, then its own component
    assert [r.cached.step_counts for r in ad._runners.values()] == [[1] * spec["steps"]] * 2
    ranges = ad.component_ranges
    ref = sample(spec, CachedAsyncReference(model, ranges, model_timesteps(spec), spec["warm_up"],
                                            hook_reference(model, FAMILIES[name], sched)))
    # the same fp32 operations in the same order, but for the cache arithmetic: residual stores and adds (block
    # level), gated adds of cached unit outputs (branch level) -- a few ulps per step of the largest value
    torch.testing.assert_close(got, ref, rtol=0, atol=fp32_atol(ref, spec["steps"]))
    plain_async = sample(spec, parallel.AsyncDenoiser(model, num_components=2, warm_up=spec["warm_up"], emulate=True,
                                                      balance="uniform"))
    assert not torch.equal(got, plain_async)          # the schedule's reuse ran inside the components
    assert not torch.equal(got, sample(spec, cached))  # and the components ran asynchronously


def test_split_weighs_blocks_by_the_schedule():
    """Blocks the schedule reuses at most steps count for less: the weights are each block's computed fraction."""
    spec = dict(SPEC, model="flux-dev")
    model = transformer_of(spec)
    ts = sampler_timesteps(dict(model="x", steps=8))
    mask = [[s == 0 or b < 2 for b in range(4)] for s in range(8)]  # single blocks computed at step 0 only
    cached = l2c.compile_schedule(model, l2c.Schedule.from_mask(model, ts, mask, branches=["block"]),
                                  cuda_graphs=False)
    ad = parallel.AsyncDenoiser(cached, num_components=2, warm_up=1, emulate=True, balance="uniform")
    assert ad.split.info["schedule_weights"] == pytest.approx([1.0, 1.0, 1 / 8, 1 / 8])
    assert ad.component_ranges == [(0, 1), (1, 4)]  # costs 1 | 1 + 1/8 + 1/8
