"""AsyncDenoiser in one process: the N=1 / no-process-group fallback, the split, the emulation."""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch

import l2c_kernels as l2c
from l2c_kernels import parallel, schedules
from l2c_kernels.parallel.partition import balanced_split, example_inputs, uniform_split
from tests.tiny_models import dit_inputs, pixart_inputs, tiny_dit, tiny_pixart

from . import workers


@pytest.fixture(scope="module")
def dit():
    return workers.base_model(dict(model="dit-digits"))[0]


# ------------------------------------------------------------------ the split
def _brute_force(costs, n):
    m = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, m), n - 1):
        b = (0,) + cuts + (m,)
        worst = max(sum(costs[b[i]:b[i + 1]]) for i in range(n))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_balanced_split_minimises_the_largest_component(seed, n):
    g = torch.Generator().manual_seed(seed)
    costs = (torch.rand(9, generator=g) + 0.05).tolist()
    ranges = balanced_split(costs, n)
    assert len(ranges) == n and ranges[0][0] == 0 and ranges[-1][1] == len(costs)
    assert all(a < b for a, b in ranges) and all(ranges[i][1] == ranges[i + 1][0] for i in range(n - 1))
    assert max(sum(costs[a:b]) for a, b in ranges) == pytest.approx(_brute_force(costs, n))


def test_uniform_split_and_errors():
    assert uniform_split(12, 2) == [(0, 6), (6, 12)]
    assert uniform_split(12, 3) == [(0, 4), (4, 8), (8, 12)]
    assert [b - a for a, b in uniform_split(7, 3)] in ([3, 2, 2], [2, 3, 2], [2, 2, 3])
    with pytest.raises(ValueError, match="cannot split 2 blocks into 3 non-empty components"):
        balanced_split([1.0, 1.0], 3)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_measured_split_is_the_best_cut_of_its_measured_costs(dit, n):
    """``balance="measure"`` times every block (the final layer added to the last) and cuts them into
    the contiguous runs whose largest cost is smallest. The timings vary with the machine's load, so
    the check is on what is done with them (deterministic): the cut is the brute-force optimum of the
    recorded costs, and the reported imbalance is the largest recorded component cost over their mean."""
    torch.set_num_threads(1)
    inputs = example_inputs(dit, batch=4)
    ad = parallel.AsyncDenoiser(dit, num_components=n, warm_up=1, emulate=True, sample_inputs=inputs)
    costs = ad.block_costs
    assert ad.split.method == "measure" and len(costs) == len(dit.transformer_blocks) and min(costs) > 0
    assert ad.split.info["final_layer_cost"] > 0
    ranges = ad.component_ranges
    assert len(ranges) == n and ranges[0][0] == 0 and ranges[-1][1] == len(costs)
    comp = [sum(costs[a:b]) for a, b in ranges]
    assert max(comp) == pytest.approx(_brute_force(costs, n), rel=1e-12)
    assert ad.component_costs == pytest.approx(comp, rel=1e-12)
    assert ad.split.imbalance == pytest.approx(max(comp) / (sum(comp) / n), rel=1e-9)


def test_split_follows_the_cache_schedule(dit):
    """With a DeepCache schedule the middle blocks are mostly reused: the split weighs each block by how
    often the schedule computes it, gives the middle component more blocks, and balances the weighted
    cost (equal per-block costs here, so the check does not depend on timings)."""
    ts = workers.timesteps(workers.SCHEDULE, 12)
    cached = l2c.compile_schedule(dit, schedules.deepcache(dit, ts, interval=3, keep_first=2, keep_last=1),
                                  cuda_graphs=False)
    ad = parallel.AsyncDenoiser(cached, num_components=3, warm_up=1, emulate=True, balance="uniform",
                                sample_inputs=example_inputs(dit, batch=16))
    sizes = [b - a for a, b in ad.component_ranges]
    assert sizes[1] > sizes[0] and sizes[1] > sizes[2], ad.component_ranges
    w = ad.split.info["schedule_weights"]
    assert w[0] == 1.0 and w[5] < 0.5
    costs = [sum(w[a:b]) for a, b in ad.component_ranges]
    assert max(costs) / min(costs) < 1.2, (ad.component_ranges, costs)


def test_given_costs_and_uniform_balance():
    m = tiny_dit(layers=6)
    ad = parallel.AsyncDenoiser(m, num_components=2, warm_up=1, emulate=True, balance=[1, 1, 1, 1, 1, 5])
    assert ad.component_ranges == [(0, 5), (5, 6)] and ad.split.method == "given"
    ad = parallel.AsyncDenoiser(m, num_components=3, warm_up=1, emulate=True, balance="uniform")
    assert ad.component_ranges == [(0, 2), (2, 4), (4, 6)]
    same = parallel.AsyncDenoiser(m, num_components=3, warm_up=1, emulate=True, balance=ad.split)
    assert same.split is ad.split
    with pytest.raises(ValueError, match="balance has 2 costs for 6 blocks"):
        parallel.AsyncDenoiser(m, num_components=2, emulate=True, balance=[1, 2])
    with pytest.raises(ValueError, match="balance must be 'measure', 'uniform' or a list of 6 block costs; got 'fastest'"):
        parallel.AsyncDenoiser(m, num_components=2, emulate=True, balance="fastest")


# ------------------------------------------------------------------ one process
@pytest.mark.parametrize("make,inputs", [(tiny_dit, dit_inputs), (tiny_pixart, pixart_inputs)])
def test_one_component_is_the_plain_model(make, inputs):
    m = make(layers=4)
    ad = parallel.AsyncDenoiser(m, num_components=1)
    assert not ad.active and ad.config is m.config and ad.dtype == torch.float32
    for t in (981, 500):
        a = inputs(batch=4, t=t)
        assert torch.equal(ad(**a).sample, m(**a).sample)
        assert torch.equal(ad(**a, return_dict=False)[0], m(**a, return_dict=False)[0])


def test_one_component_of_a_cached_model_is_the_cached_model(dit):
    spec = dict(model="dit-digits", batch=2, steps=8, schedule=("uniform", 2))
    cached, kind, sc = workers.build(spec)
    ad = parallel.AsyncDenoiser(cached, num_components=1)
    got = workers.sample(ad, kind, sc, 8, batch=2)
    assert torch.equal(got, workers.reference(spec))


def test_without_a_process_group_runs_the_plain_model_and_warns():
    m = tiny_dit(layers=4)
    with pytest.warns(UserWarning, match="torchrun --nproc_per_node=2"):
        ad = parallel.AsyncDenoiser(m, num_components=2, warm_up=1)
    a = dit_inputs(batch=2)
    assert torch.equal(ad(**a).sample, m(**a).sample)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parallel.AsyncDenoiser(m, num_components=1)


def test_invalid_settings():
    m = tiny_dit(layers=3)
    with pytest.raises(ValueError, match="exceeds"):
        parallel.AsyncDenoiser(m, num_components=4, emulate=True)
    with pytest.raises(ValueError, match="warm_up"):
        parallel.AsyncDenoiser(m, num_components=2, warm_up=0, emulate=True)
    with pytest.raises(ValueError, match="num_components and stride must be >= 1"):
        parallel.AsyncDenoiser(m, num_components=0)


# ------------------------------------------------------------------ emulation of the ranks
@pytest.mark.parametrize("n,stride", [(3, 1), (2, 2)])
def test_emulation_with_warm_up_on_every_step_is_exact(n, stride):
    spec = dict(model="tiny-dit", layers=6, batch=2, steps=6, N=n, stride=stride, warm_up=6)
    torch.testing.assert_close(workers.emulated(spec), workers.reference(spec), rtol=0, atol=1e-6)


def test_emulation_runs_the_asynchronous_schedule():
    spec = dict(model="tiny-dit", layers=6, batch=2, steps=8, N=2, warm_up=2)
    model, kind, sc = workers.build(spec)
    ad = workers.denoiser(model, dict(spec, emulate=True), sc)
    out = workers.sample(ad, kind, sc, 8, batch=2)
    assert len(ad.timings["compute"]) == 6
    # the independent reference computes the same stale-input arithmetic with the same fp32 ops in the
    # same order (measured difference 0); 1e-6 leaves a few ulps at the latents' magnitude (<= 1)
    torch.testing.assert_close(out, workers.async_reference(spec, ad.component_ranges), rtol=0, atol=1e-6)
    # and it is not the full computation: random weights make stale inputs change the output by O(1)
    assert (out - workers.reference(spec)).abs().max() > 0.1
    d = ad.describe()
    assert d["world_size"] == 2 and d["split"]["ranges"] == [[0, 3], [3, 6]]
    # the same call sequence again is a new generation with the same result
    assert torch.equal(workers.sample(ad, kind, sc, 8, batch=2), out)


ASYNC_CASES = {
    "dit-N2": dict(model="tiny-dit", layers=6, batch=2, steps=8, N=2, warm_up=2),
    "dit-N3": dict(model="tiny-dit", layers=6, batch=2, steps=8, N=3, warm_up=2),
    "dit-N3-warm-up-4": dict(model="tiny-dit", layers=6, batch=2, steps=8, N=3, warm_up=4),
    "pixart-N2": dict(model="tiny-pixart", layers=6, batch=2, steps=8, N=2, warm_up=2),
    "dit-stride2-even": dict(model="tiny-dit", layers=6, batch=2, steps=8, N=2, stride=2, warm_up=2),
    "dit-stride2-odd": dict(model="tiny-dit", layers=6, batch=2, steps=8, N=2, stride=2, warm_up=3),
    "dit-N3-stride2": dict(model="tiny-dit", layers=6, batch=2, steps=9, N=3, stride=2, warm_up=2),
}


@pytest.mark.parametrize("name", list(ASYNC_CASES))
def test_emulation_equals_the_independent_reference(name):
    """Every emulated rank's work against the hook-based reference of asynchronous denoising
    (components fed the previous step's outputs, exact warm-up, stride 2 in pairs of steps, an odd
    last step included): the same fp32 operations, so equal to within a few ulps (measured 0)."""
    spec = ASYNC_CASES[name]
    model, kind, sc = workers.build(spec)
    ad = workers.denoiser(model, dict(spec, emulate=True), sc)
    out = workers.sample(ad, kind, sc, spec["steps"], batch=2)
    torch.testing.assert_close(out, workers.async_reference(spec, ad.component_ranges), rtol=0, atol=1e-6)


def test_emulation_of_a_cached_model_equals_the_independent_reference():
    """AsyncDiff over a DeepCache schedule: the reference runs the schedule's hook reference inside the
    asynchronous call. The runtime's fused residual ops round differently from the hooked model's
    ``x + gate * y`` (fp32, about 1e-7 per op); over 8 DDIM steps the measured difference is 7e-6 on
    latents of magnitude <= 1, so 5e-5 (about 400 ulps) bounds rounding while a wrong cache or stale
    input (differences of order 1, as above) fails."""
    spec = dict(model="tiny-dit", layers=6, batch=2, steps=8, N=2, warm_up=2, schedule=("deepcache", 3))
    model, kind, sc = workers.build(spec)
    ad = workers.denoiser(model, dict(spec, emulate=True), sc)
    out = workers.sample(ad, kind, sc, spec["steps"], batch=2)
    torch.testing.assert_close(out, workers.async_reference(spec, ad.component_ranges), rtol=0, atol=5e-5)


def test_stride_two_checks_the_timestep_it_computed_ahead():
    """Stride 2 computes step s+1 ahead (its timestep extrapolated from the last two); a sampler that
    then passes another timestep gets an error, not a prediction for the wrong noise level."""
    spec = dict(model="tiny-dit", layers=4, batch=2, steps=8, N=2, stride=2, warm_up=2)
    model, kind, sc = workers.build(spec)
    ad = workers.denoiser(model, dict(spec, emulate=True), sc)
    a = dit_inputs(batch=2, size=8)
    ts = workers.timesteps(sc, 8)
    for t in ts[:3]:
        ad(**dict(a, timestep=torch.full((2,), t)))
    with pytest.raises(parallel.AsyncDiffError, match="computed ahead"):
        ad(**dict(a, timestep=torch.full((2,), ts[3] + 7)))


def test_weights_fingerprint_sees_swapped_weights():
    """Ranks compare a fingerprint of their weights at start-up: a position-weighted float64 sum, so two
    swapped weights (same values, same plain sum) differ, while the same weights in another dtype (which
    the dtype field reports) or another copy agree."""
    import copy

    from l2c_kernels.parallel.async_denoiser import weights_fingerprint

    m = tiny_dit(layers=2)
    base = weights_fingerprint(list(m.parameters()))
    assert weights_fingerprint(list(copy.deepcopy(m).parameters())) == base
    assert weights_fingerprint(list(copy.deepcopy(m).double().parameters())) == base
    swapped = copy.deepcopy(m)
    w = swapped.transformer_blocks[1].ff.net[2].weight
    with torch.no_grad():
        w.view(-1)[:2] = w.view(-1)[:2].flip(0).clone()
    assert float(sum(p.double().sum() for p in swapped.parameters())) == pytest.approx(
        float(sum(p.double().sum() for p in m.parameters())), abs=1e-12)
    assert weights_fingerprint(list(swapped.parameters())) != base
    # chunking does not change the value beyond float64 summation order
    assert weights_fingerprint(list(m.parameters()), chunk=7) == pytest.approx(base, rel=1e-12)
