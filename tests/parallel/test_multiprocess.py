"""AsyncDenoiser across spawned processes joined by a gloo group (CPU).

Each group of processes is started once per module and runs a list of scenarios; the tests
compare what every rank returned with the single-process model computed here.
"""
from __future__ import annotations

import pytest
import torch

from l2c_kernels.models.classifier import predict_digits

from . import workers
from .helpers import psnr, raise_failures, run_ranks

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")

DIT = dict(model="dit-digits", batch=4)
PIX = dict(model="tiny-pixart", layers=6, batch=2)

# Lower bounds on the PSNR (dB, images in [-1, 1]) of the asynchronous output against the
# single-process output: the trained dit-digits, 20 DDIM steps, 3 exact warm-up steps. The exact
# check is the comparison with the independent reference (tests/parallel/async_reference.py); these
# floors state how far the asynchronous images drift. With a fixed (uniform) split the output is
# deterministic up to fp32 rounding, so the floor is the measured value minus 0.5 dB: 29.24 (2
# components), 21.59 (3 components), 19.12 (2 components, stride 2). The DeepCache run measures its
# split, which moves with the machine's load: every cut from 4+8 to 8+4 blocks measured 24.30-25.92
# (25.68 at 6+6), floor 23.8. Images from another seed score 12.55 dB.
ASYNC_PSNR_DB = {(2, "async-dit"): 28.7, (2, "cached-async"): 23.8, (3, "async-dit"): 21.1,
                 (3, "stride2-async"): 18.6}

TWO = {
    "exact-dit": dict(DIT, N=2, warm_up=6, steps=6, balance="measure"),
    "exact-pixart": dict(PIX, N=2, warm_up=5, steps=5),
    "async-dit": dict(DIT, N=2, warm_up=3, steps=20, repeats=2),
    "cached-exact": dict(DIT, N=2, warm_up=8, steps=8, schedule=("uniform", 2)),
    "cached-async": dict(DIT, N=2, warm_up=3, steps=20, schedule=("deepcache", 3), balance="measure"),
    "pipeline": dict(DIT, N=2, warm_up=2, steps=8, pipeline=True),
    "mismatch-warm-up": dict(DIT, N=2, warm_up=3, steps=6, per_rank={1: {"warm_up": 2}}),
    "mismatch-N": dict(DIT, N=2, warm_up=3, steps=6, per_rank={1: {"N": 3}}),
    "mismatch-steps": dict(DIT, N=2, warm_up=3, steps=6, pass_timesteps=True, per_rank={1: {"steps": 8}}),
    "mismatch-steps-at-sampling": dict(DIT, N=2, warm_up=3, steps=6, per_rank={1: {"steps": 8}}),
    "different-seeds": dict(DIT, N=2, warm_up=3, steps=6, per_rank={1: {"seed": 1}}),
    "mismatch-weights": dict(DIT, N=2, warm_up=3, steps=6, per_rank={1: {"perturb_weights": True}}),
    "mismatch-dtype": dict(DIT, N=2, warm_up=3, steps=6, per_rank={1: {"dtype": "float64"}}),
    "mismatch-schedule": dict(DIT, N=2, warm_up=3, steps=6, schedule=("uniform", 2),
                              per_rank={1: {"schedule": ("uniform", 3)}}),
}

THREE = {
    "exact-dit": dict(DIT, N=3, warm_up=5, steps=5),
    "async-dit": dict(DIT, N=3, warm_up=3, steps=20),
    "stride2-exact": dict(DIT, N=2, stride=2, warm_up=6, steps=6),
    "stride2-async": dict(DIT, N=2, stride=2, warm_up=3, steps=20),
}


@pytest.fixture(scope="module")
def two():
    res = run_ranks(workers.session_worker, 2, TWO, deadline_s=480)
    raise_failures(res)
    return {r: v["value"] for r, v in res.items()}


@pytest.fixture(scope="module")
def three():
    res = run_ranks(workers.session_worker, 3, THREE, deadline_s=480)
    raise_failures(res)
    return {r: v["value"] for r, v in res.items()}


def _images(results: dict, name: str) -> list[torch.Tensor]:
    out = []
    for r, v in sorted(results.items()):
        got = v[name]
        assert got["raised"] is None, f"rank {r}: {got['message']}"
        out.append(got["images"][0])
    return out


def _all_ranks_agree(images: list[torch.Tensor]) -> None:
    for r, im in enumerate(images[1:], 1):
        assert torch.equal(im, images[0]), f"rank {r} returned different images from rank 0"


# ------------------------------------------------------------------ exact: warm-up covers every step
@pytest.mark.parametrize("name", ["exact-dit", "exact-pixart", "cached-exact"])
def test_two_ranks_warm_up_is_exact(two, name):
    images = _images(two, name)
    _all_ranks_agree(images)
    ref = workers.reference(TWO[name])
    torch.testing.assert_close(images[0], ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["exact-dit", "stride2-exact"])
def test_three_ranks_warm_up_is_exact(three, name):
    images = _images(three, name)
    _all_ranks_agree(images)
    torch.testing.assert_close(images[0], workers.reference(THREE[name]), rtol=0, atol=1e-6)


# ------------------------------------------------------------------ asynchronous steps
@pytest.mark.parametrize("world,name", [(2, "async-dit"), (2, "cached-async"), (3, "async-dit"), (3, "stride2-async")])
def test_asynchronous_steps_close_to_single_process(request, world, name):
    results = request.getfixturevalue("two" if world == 2 else "three")
    spec = (TWO if world == 2 else THREE)[name]
    images = _images(results, name)
    _all_ranks_agree(images)
    ref = workers.reference(spec)
    db = psnr(images[0], ref)
    print(f"\n{name}, {world} processes: PSNR {db:.1f} dB against the single-process output")
    assert db >= ASYNC_PSNR_DB[world, name]
    # still the same digits: the bundled classifier reads them as it reads the single-process images
    assert torch.equal(predict_digits(images[0]), predict_digits(ref))
    assert not torch.equal(images[0], ref)  # the asynchronous steps did run
    # the processes computed what the independent reference of asynchronous denoising computes on the same
    # split (tests/parallel/async_reference.py): the same fp32 ops for the plain model (atol 1e-6, a few ulps);
    # over a cache schedule the fused residual ops round differently from the hooked model (measured 7e-6
    # on the tiny model in test_single_process; bound 5e-5)
    ranges = [tuple(r) for r in results[0][name]["describe"]["split"]["ranges"]]
    atol = 5e-5 if spec.get("schedule") else 1e-6
    torch.testing.assert_close(images[0], workers.async_reference(spec, ranges), rtol=0, atol=atol)


def test_inside_an_unchanged_dit_pipeline(two):
    images = _images(two, "pipeline")
    _all_ranks_agree(images)
    spec = TWO["pipeline"]
    ranges = [tuple(r) for r in two[0]["pipeline"]["describe"]["split"]["ranges"]]
    torch.testing.assert_close(images[0], workers.pipeline_reference(spec, async_ranges=ranges), rtol=0, atol=1e-6)
    assert psnr(images[0] * 2 - 1, workers.pipeline_reference(spec) * 2 - 1) > 20


def test_second_generation_starts_cleanly(two):
    for r, v in two.items():
        first, second = v["async-dit"]["images"]
        assert torch.equal(first, second), f"rank {r}: a second generation gave different images"


def test_rounds_and_collectives(two, three):
    steps, warm = TWO["async-dit"]["steps"], TWO["async-dit"]["warm_up"]
    for v in two.values():
        got = v["async-dit"]
        assert got["rounds"] == 2 * (steps - warm)  # two generations
        assert got["describe"]["split"]["ranges"] == [[0, 6], [6, 12]]
    for v in three.values():
        got = v["stride2-async"]
        # stride 2: one parallel round (one collective) serves two steps
        assert got["rounds"] == (20 - 3 + 1) // 2
        assert got["describe"]["roles"] == [[0, 1], [1, 1], [1, 0]]


def test_measured_split_is_the_same_on_every_rank(two):
    splits = [v["cached-async"]["describe"]["split"] for v in two.values()]
    assert all(s == splits[0] for s in splits)
    assert splits[0]["method"] == "measure"


# ------------------------------------------------------------------ start-up agreement
@pytest.mark.parametrize("name,field", [("mismatch-warm-up", "warm_up"), ("mismatch-N", "num_components"),
                                        ("mismatch-steps", "num_steps"), ("mismatch-weights", "weights_checksum"),
                                        ("mismatch-dtype", "dtype"), ("mismatch-schedule", "cache_schedule")])
def test_config_mismatch_detected_at_start_up(two, name, field):
    for r, v in two.items():
        got = v[name]
        # ConfigMismatchError comes only from the start-up agreement (a timeout raises AsyncDiffError), so the
        # type alone shows the mismatch was found at start-up, without timing the run on a loaded machine
        assert got["raised"] == "ConfigMismatchError", f"rank {r}: {got}"
        assert field in got["message"]


@pytest.mark.parametrize("name,words", [("mismatch-steps-at-sampling", "first_timestep"),
                                        ("different-seeds", "latent_sum")])
def test_ranks_with_different_inputs_fail_at_the_first_step(two, name, words):
    for r, v in two.items():
        got = v[name]
        assert got["raised"] == "ConfigMismatchError", f"rank {r}: {got}"
        assert words in got["message"]


# ------------------------------------------------------------------ faults
FAULT = dict(model="tiny-dit", layers=4, N=2, warm_up=2, steps=8, victim=1, at=4)


def test_killed_rank_makes_survivors_raise():
    res = run_ranks(workers.failing_worker, 2, dict(FAULT, mode="die", timeout_s=10), deadline_s=90)
    assert res[1] == {"ok": False, "type": "NoResult"}  # the victim exited
    assert res[0]["ok"], res[0]
    got = res[0]["value"]
    assert got["raised"] == "AsyncDiffError"
    assert got["after_s"] < 10
    assert "rank 0/2" in got["message"] and "step 4" in got["message"]


def test_hung_rank_makes_survivors_raise_within_the_timeout():
    timeout = 3.0
    res = run_ranks(workers.failing_worker, 2, dict(FAULT, mode="hang", timeout_s=timeout, hang_s=timeout + 4),
                    deadline_s=90)
    got = res[0]["value"]
    assert got["raised"] == "AsyncDiffError"
    assert timeout - 0.5 <= got["after_s"] < timeout + 5
    assert "step 4" in got["message"]
