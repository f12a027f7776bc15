"""Learning on real pipeline shapes: a DiT-XL/2-shaped DiTPipeline (learned sigma, VAE, ImageNet labels)
and a PixArt-Sigma-shaped pipeline (tiny T5, learned sigma, 2:1 latents); a transformer with the user's
own conditioning; flow-matching timesteps; the errors a user gets for input that does not fit.

Reference for "all-compute reproduces the pipeline": the unmodified diffusers pipeline from the same
generator seed. Both run the same float32 arithmetic in a different order (our runtime's fused ops,
batched CFG), so images agree to float32 rounding: 1e-4 absolute on [0, 1] images and 1e-4 relative
on latents (observed about 2e-6).
"""
from __future__ import annotations

import pytest
import torch

import l2c_kernels as l2c
from l2c_kernels.learn import denoiser_for
from tests.learn.pipeline_models import decode, dit_xl_shaped_pipeline, pixart_sigma_shaped_pipeline
from tests.tiny_models import rel_err

STEPS = 3
FAST = dict(iterations=2, batch_size=2, calibration_samples=2, progress=False, structured_candidates=False)
PROMPTS = ["a red cat", "two small dogs"]
PIXART_SIZE = dict(height=32, width=16, max_sequence_length=16)   # 2:1 latents (16 x 8)


@pytest.fixture(scope="module")
def dit_pipe():
    return dit_xl_shaped_pipeline()


@pytest.fixture(scope="module")
def pixart_pipe():
    return pixart_sigma_shaped_pipeline()


def _full_compute(model, sched):
    return l2c.compile_schedule(model, l2c.Schedule.full(model, sched.timesteps))


def test_dit_xl_shaped_pipeline_learns_a_schedule_that_reproduces_the_pipeline(dit_pipe):
    pipe, labels, g = dit_pipe, [207, 360], 4.0
    sched = l2c.learn_schedule(pipe, STEPS, 0.4, labels=labels, guidance_scale=g, **FAST)
    model = pipe.transformer
    sched.validate_for(model)
    assert sched.num_steps == STEPS and sched.flops_removed_fraction() >= 0.4 - 1e-9
    assert sched.params["guidance_scale"] == g
    # all-compute through the runtime, sampled by the library, equals the pipeline's own images
    den = denoiser_for(pipe, labels=labels, cfg=g)
    assert den.latent_shape == (4, 8, 8) and den.cfg == g
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    x, _ = den.sample_with(_full_compute(model, sched), STEPS, noise)
    ref = pipe(class_labels=labels, num_inference_steps=STEPS, guidance_scale=g,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    torch.testing.assert_close(decode(pipe, x), torch.from_numpy(ref).permute(0, 3, 1, 2), rtol=0, atol=1e-4)
    # the learned schedule runs inside the unmodified pipeline: its timesteps are the pipeline's
    fast = l2c.compile_schedule(model, sched)
    x_lib, _ = den.sample_with(fast, STEPS, noise)
    pipe.transformer = fast
    try:
        out = pipe(class_labels=labels, num_inference_steps=STEPS, guidance_scale=g,
                   generator=torch.Generator().manual_seed(0), output_type="np").images
    finally:
        pipe.transformer = model
    torch.testing.assert_close(decode(pipe, x_lib), torch.from_numpy(out).permute(0, 3, 1, 2), rtol=0, atol=1e-4)


def test_pixart_sigma_shaped_pipeline_learns_on_non_square_latents(pixart_pipe):
    pipe = pixart_pipe
    sched = l2c.learn_schedule(pipe, STEPS, 0.4, prompts=PROMPTS, **PIXART_SIZE, **FAST)
    model = pipe.transformer
    sched.validate_for(model)
    assert sched.flops_removed_fraction() >= 0.4 - 1e-9
    # FLOPs at the real token counts: 16 x 8 latents / patch 2 = 32 image tokens, 16 text tokens
    ad = l2c.adapters.adapter_for(model)
    assert sched.branch_flops == ad.branch_flops(model, tokens=32, text_tokens=16)
    den = denoiser_for(pipe, prompts=PROMPTS, height=32, width=16, max_sequence_length=16)
    assert den.latent_shape == (4, 16, 8) and den.text_tokens == 16 and den.cfg == 4.5  # the pipeline's default
    noise = torch.randn((2, 4, 16, 8), generator=torch.Generator().manual_seed(0))
    x, _ = den.sample_with(_full_compute(model, sched), STEPS, noise)
    ref = pipe(prompt=PROMPTS, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
               use_resolution_binning=False, clean_caption=False, output_type="latent", **PIXART_SIZE).images
    assert rel_err(x, ref) < 1e-4


def test_transformer_with_own_conditions_is_the_same_denoiser_as_its_pipeline(dit_pipe):
    from diffusers import DDIMScheduler

    pipe, g = dit_pipe, 3.0
    by_pipe = denoiser_for(pipe, labels=[5, 999], cfg=g)
    # the user's own loop: unconditional half first (the documented default order)
    cond = dict(class_labels=torch.tensor([1000, 1000, 5, 999]))
    by_hand = denoiser_for(pipe.transformer, cfg=g, scheduler=DDIMScheduler(), conditions=cond,
                           latent_shape=(4, 8, 8))
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    a, ta = by_pipe.sample_with(pipe.transformer, STEPS, noise)
    b, tb = by_hand.sample_with(pipe.transformer, STEPS, noise)
    assert ta == tb
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    sched = l2c.learn_schedule(pipe.transformer, STEPS, 0.5, scheduler=DDIMScheduler(), conditions=cond,
                               latent_shape=(4, 8, 8), guidance_scale=g, **FAST)
    sched.validate_for(pipe.transformer)
    assert sched.timesteps == [int(t) for t in ta]


def test_flow_matching_scheduler_runs_the_loop_with_shifted_float_timesteps(dit_pipe):
    """A flow-matching scheduler with dynamic shifting: ``set_timesteps`` gets the pipelines' ``sigmas`` and
    ``mu`` for this image's token count, and the model is called with exactly those float timesteps."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sch = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256)
    tr = dit_pipe.transformer
    den = denoiser_for(tr, cfg=1.0, scheduler=sch, conditions=dict(class_labels=torch.tensor([3, 4])),
                       latent_shape=(4, 8, 8))
    ref = FlowMatchEulerDiscreteScheduler.from_config(sch.config)
    mu = calculate_shift(16, 16, 256, 0.5, 1.15)   # 8 x 8 latents / patch 2 = 16 tokens
    ref.set_timesteps(4, sigmas=np.linspace(1.0, 1 / 4, 4), mu=mu)
    seen = []

    def call(step, args):
        seen.append(args["timestep"].clone())
        return tr(**args).sample

    with torch.no_grad():
        out = den.run(call, 4, torch.randn(2, 4, 8, 8))
    assert [float(t[0]) for t in seen] == pytest.approx([float(t) for t in ref.timesteps])
    assert all(t.is_floating_point() and t.shape == (2,) for t in seen)
    assert torch.isfinite(out.sample).all()


def test_errors_name_the_problem(dit_pipe, pixart_pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler

    with pytest.raises(ValueError, match=r"out of range.*0\.\.999"):
        l2c.learn_schedule(dit_pipe, STEPS, 0.4, labels=[207, 1000], **FAST)
    with pytest.raises(ValueError, match="needs calibration prompts"):
        l2c.learn_schedule(pixart_pipe, STEPS, 0.4, **FAST)
    with pytest.raises(ValueError, match=r"height=18 does not fit DiTPipeline.*multiple of 4"):
        l2c.learn_schedule(dit_pipe, STEPS, 0.4, labels=[1], height=18, **FAST)
    with pytest.raises(ValueError, match=r"width=18 does not fit PixArtSigmaPipeline"):
        l2c.learn_schedule(pixart_pipe, STEPS, 0.4, prompts=PROMPTS, height=32, width=18, **FAST)
    with pytest.raises(ValueError, match=r"FlowMatchEulerDiscreteScheduler does not fit DiTPipeline.*noise prediction"):
        l2c.learn_schedule(dit_pipe, STEPS, 0.4, labels=[1], scheduler=FlowMatchEulerDiscreteScheduler(), **FAST)
    with pytest.raises(ValueError, match=r"flow-euler does not fit"):
        l2c.learn_schedule(dit_pipe, STEPS, 0.4, labels=[1], scheduler="flow-euler", **FAST)
    with pytest.raises(ValueError, match="unknown scheduler 'heun'"):
        l2c.learn_schedule(dit_pipe, STEPS, 0.4, labels=[1], scheduler="heun", **FAST)
    with pytest.raises(TypeError, match="scheduler=, conditions="):
        l2c.learn_schedule(dit_pipe.transformer, STEPS, 0.4, **FAST)
    with pytest.raises(TypeError, match="supported for"):
        l2c.learn_schedule(object(), STEPS, 0.4, **FAST)


def test_learns_where_the_model_is_in_its_dtype_with_a_float32_router():
    from l2c_kernels.learn import train_router

    pipe = dit_xl_shaped_pipeline(layers=1).to(torch.bfloat16)
    res = train_router(pipe, STEPS, budget=0.5, labels=[207, 3], guidance_scale=2.0, **FAST)
    assert res.scores.dtype == torch.float32 and res.mask is not None
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in pipe.transformer.parameters())
    sched = l2c.Schedule.from_mask(pipe.transformer, res.timesteps, res.mask, forecast=res.forecast)
    sched.validate_for(pipe.transformer)
    assert res.calibration_error is not None and res.calibration_error == res.calibration_error  # not NaN
