"""Sampling: determinism with seeds, noise independent of batching, schedulers, clear errors."""
from __future__ import annotations

import pytest
import torch

from l2c_kernels import sampling
from l2c_kernels import models
from l2c_kernels.models import load


@pytest.fixture(scope="module")
def dit():
    return load("dit-digits")


def test_same_seed_same_images_and_chunking_does_not_matter(dit):
    a = models.sample(dit, labels=[3, 7, 1], steps=4, cfg=2.0, seed=5, progress=False)
    b = models.sample(dit, labels=[3, 7, 1], steps=4, cfg=2.0, seed=5, progress=False, batch_size=2)
    c = models.sample(dit, labels=[3, 7, 1], steps=4, cfg=2.0, seed=6, progress=False)
    assert a.shape == (3, 1, 16, 16) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert (a - c).abs().max() > 0.1


@pytest.mark.parametrize("name", sampling.SCHEDULERS)
def test_every_scheduler_runs_its_timesteps(dit, name):
    ts = models.timesteps_for(dit, 5, name)
    assert len(ts) == 5 and ts[0] > ts[-1]
    seen = []
    orig = dit.transformer.forward

    class Spy(torch.nn.Module):
        def forward(self, *args, **kw):
            seen.append(float(kw["timestep"][0]))
            return orig(*args, **kw)

    imgs = models.sample(dit, labels=[0, 1], steps=5, scheduler=name, cfg=1.5, progress=False, transformer=Spy())
    assert torch.isfinite(imgs).all()
    assert seen == pytest.approx(ts)


def test_pixart_sampling_from_labels_and_prompts():
    try:
        pix = load("pixart-digits")
    except FileNotFoundError:
        pytest.skip("pixart-digits weights not present")
    from l2c_kernels.models.text_encoder import caption_for

    a = models.sample(pix, labels=[2, 9], steps=3, cfg=2.0, seed=1, progress=False)
    b = models.sample(pix, prompts=[caption_for(2, 0), caption_for(9, 1)], steps=3, cfg=2.0, seed=1, progress=False)
    torch.testing.assert_close(a, b)


def test_sampling_errors(dit):
    with pytest.raises(ValueError, match="scheduler"):
        models.sample(dit, labels=[1], steps=2, scheduler="heun", progress=False)
    with pytest.raises(ValueError, match="steps"):
        models.sample(dit, labels=[1], steps=0, progress=False)
    with pytest.raises(ValueError, match="0-9"):
        models.sample(dit, labels=[12], steps=2, progress=False)
    with pytest.raises(ValueError, match="class-conditional"):
        models.sample(dit, prompts=["a 7"], steps=2, progress=False)


def test_save_grid(tmp_path, dit):
    from PIL import Image

    imgs = torch.linspace(-1, 1, 5 * 256).reshape(5, 1, 16, 16)
    p = sampling.save_grid(imgs, tmp_path / "g.png", nrow=3, scale=2, pad=1)
    im = Image.open(p)
    assert im.size == (3 * 33 + 1, 2 * 33 + 1)


def test_timesteps_of_a_flow_matching_bundle_are_the_ones_sample_calls_with():
    flux = load("flux-digits")
    ts = models.timesteps_for(flux, 4)
    seen = []
    orig = flux.transformer.forward

    class Spy(torch.nn.Module):
        def forward(self, *args, **kw):
            seen.append(1000.0 * float(kw["timestep"][0]))  # FluxPipeline passes t / 1000
            return orig(*args, **kw)

    models.sample(flux, labels=[3], steps=4, cfg=1.0, progress=False, transformer=Spy())
    assert seen == pytest.approx(ts, abs=1e-3)
    with pytest.raises(ValueError, match="flow-matching"):
        models.timesteps_for(flux, 4, "dpm++")
