"""Learning block-level schedules for the bundled flux-digits with classifier-free guidance.

References: ``sampling.sample`` of flux-digits (Euler flow matching over FluxPipeline's sigmas, CFG in
one batch ``[uncond; cond]``) with the unmodified transformer, and, for a learned schedule, forward
hooks on the unmodified transformer (``tests/families/block_reference.py``) driven by the same
sampling loop. The compiled all-compute schedule runs every block through the runtime's residual ops
(``out - in`` then ``in + residual``): equal to the plain model up to float32 rounding of those two
ops per block (8 blocks x 4 steps on values of order 1: a few 1e-7), so 1e-5 absolute on images in [-1, 1].
"""
from __future__ import annotations

import pytest
import torch

import l2c_kernels as l2c
from l2c_kernels import models  # noqa: E402
from l2c_kernels.learn import denoiser_for
from l2c_kernels.models import flux_digits, load
from l2c_kernels.models.text_encoder import caption_for
from tests.families.block_reference import HookBlockReference
from tests.family_configs import FAMILIES

STEPS = 4
LABELS = [3, 7]
FAST = dict(iterations=2, batch_size=2, calibration_samples=2, progress=False, structured_candidates=False)


@pytest.fixture(scope="module")
def bundle():
    return load("flux-digits")


@pytest.fixture(scope="module")
def learned(bundle):
    return l2c.learn_schedule("flux-digits", STEPS, 0.5, seed=1, **FAST)


class _Stepped(torch.nn.Module):
    """Calls ``step_fn(step, kwargs)`` with the step index counted from the last ``reset()``."""

    def __init__(self, step_fn):
        super().__init__()
        self.step_fn, self.s = step_fn, 0

    def reset(self):
        self.s = 0

    def forward(self, **kw):
        out = self.step_fn(self.s, kw)
        self.s += 1
        return out


def _sample(bundle, transformer=None):
    return models.sample(bundle, labels=LABELS, steps=STEPS, seed=5, transformer=transformer, progress=False)


def test_denoiser_samples_what_sampling_sample_samples(bundle):
    den = denoiser_for(bundle, labels=LABELS, seed=5)
    assert den.cfg == bundle.recommended_cfg == 7.0   # CFG on, at the model's recommended scale
    assert den.latent_shape == (64, 4) and den.text_tokens == 8 and den.image_tokens == 64
    assert den.timesteps(STEPS) == flux_digits.timesteps_for(bundle, STEPS)
    x, _ = den.sample_with(bundle.transformer, STEPS, den.noise(5))
    torch.testing.assert_close(flux_digits.unpack(x), _sample(bundle), rtol=0, atol=1e-6)


def test_learned_schedule_validates_compiles_and_records_its_sampler(bundle, learned):
    model = bundle.transformer
    learned.validate_for(model)
    assert learned.branches == ["block"] and learned.num_blocks == 8
    assert learned.timesteps == flux_digits.timesteps_for(bundle, STEPS)
    assert learned.params["guidance_scale"] == 7.0
    assert learned.flops_removed_fraction() >= 0.5 - 1e-9
    assert learned.sampler["class"] == "FlowMatchEulerDiscreteScheduler"
    assert learned.sampler["config"]["use_dynamic_shifting"] is False and learned.sampler["shift"] == 1.0
    again = l2c.Schedule.from_dict(learned.to_dict())
    assert again.sampler == learned.sampler
    fast = l2c.compile_schedule(model, l2c.Schedule.full(model, learned.timesteps, branches=["block"]))
    torch.testing.assert_close(_sample(bundle, fast), _sample(bundle), rtol=0, atol=1e-5)


def test_learned_half_schedule_equals_the_hook_reference(bundle, learned):
    model = bundle.transformer
    fast = l2c.compile_schedule(model, learned)
    ref = HookBlockReference(model, FAMILIES["flux-schnell"], learned)   # Flux: both block kinds return (enc, img)
    got = _sample(bundle, fast)
    want = _sample(bundle, _Stepped(ref.step))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - _sample(bundle)).abs().max() > 1e-3   # reuse really changed the images


def test_flux_digits_refuses_what_does_not_fit(bundle):
    with pytest.raises(ValueError, match="dpm\\+\\+ does not fit flux-digits.*flow matching"):
        denoiser_for(bundle, labels=[1], scheduler="dpm++")
    with pytest.raises(ValueError, match="samples 16x16 images"):
        denoiser_for(bundle, labels=[1], height=32)
    with pytest.raises(ValueError, match="digit classes 0-9"):
        denoiser_for(bundle, labels=[10])


@pytest.mark.parametrize("name", ["flux-digits", "dit-digits", "pixart-digits"])
def test_drawn_labels_hold_every_digit_once_per_ten(name):
    """Without labels the learner draws its batches' digits stratified: any ten consecutive samples hold each
    class once (a calibration batch of ten sees every digit), in an order that changes with the seed."""
    drawn = []
    for seed in (0, 1):
        info = denoiser_for(name, num_samples=23, seed=seed).info
        labels = info.get("labels") or [next(v for v in range(10) if caption_for(v, i) == p)
                                         for i, p in enumerate(info["prompts"])]
        assert len(labels) == 23
        for lo in range(0, 20, 10):
            assert sorted(labels[lo:lo + 10]) == list(range(10))
        assert len(set(labels[20:])) == 3
        drawn.append(labels)
    assert drawn[0] != drawn[1]
