"""Compiled transformers dropped into unmodified diffusers pipelines (tiny configs, nothing downloaded).

Tolerances: the compiled module runs the model's own fp32 arithmetic except that residual adds are fused
(``x + gate * y`` in one pass, rounded once instead of twice), so it differs from the original model, and
a cached schedule from the hook reference of the same schedule, by rounding only: measured relative
errors 4.9e-7 (all-compute) and 5.3e-7 (cached) on the images after 4 sampler steps and the VAE. The
bound 5e-6 leaves 10x for other CPUs' kernels, while the caching itself changes the images by 5e-2.
"""
from __future__ import annotations

import torch

import l2c_kernels as l2c
from l2c_kernels.models.pipelines import PipelineTextEncoder, PipelineTokenizer
from l2c_kernels.models.text_encoder import DigitTextEncoder
from tests.hook_pipeline import HookTransformer
from tests.tiny_models import rel_err, tiny_dit, tiny_pixart

STEPS = 4
ROUNDING = 5e-6  # relative error of a correct implementation (module docstring)


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], latent_channels=4,
                         norm_num_groups=4, sample_size=16).eval()


def timesteps_of(scheduler, steps):
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


def test_dit_pipeline_runs_unchanged_with_compiled_transformer():
    from diffusers import DDIMScheduler, DiTPipeline

    model = tiny_dit(layers=3, sample_size=8)
    pipe = DiTPipeline(transformer=model, vae=tiny_vae(), scheduler=DDIMScheduler())
    ts = timesteps_of(pipe.scheduler, STEPS)

    def run():
        return pipe(class_labels=[1, 2], num_inference_steps=STEPS, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    ref = run()
    pipe.transformer = l2c.compile_schedule(model, l2c.Schedule.full(model, ts))
    full = run()
    assert rel_err(torch.tensor(full), torch.tensor(ref)) < ROUNDING
    assert pipe.transformer.current_step == STEPS - 1
    mask = [[[True, True]] * 3] + [[[s % 2 == 0, True]] * 3 for s in range(1, STEPS)]
    sched = l2c.Schedule.from_mask(model, ts, mask)
    pipe.transformer = l2c.compile_schedule(model, sched)
    cached = run()
    again = run()  # a second generation restarts the schedule and gives the same images
    assert (again == cached).all()
    pipe.transformer = HookTransformer(model, sched)  # the same schedule on the unmodified model, by hooks
    hooked = run()
    assert cached.shape == ref.shape and rel_err(torch.tensor(cached), torch.tensor(hooked)) < ROUNDING
    assert rel_err(torch.tensor(cached), torch.tensor(ref)) > 1e-2  # the reuse did change the images


def test_pixart_pipeline_runs_unchanged_with_compiled_transformer():
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    model = tiny_pixart(layers=2, sample_size=8)
    torch.manual_seed(0)
    enc = DigitTextEncoder(dim=12, num_layers=1, num_heads=2).eval()
    pipe = PixArtAlphaPipeline(tokenizer=PipelineTokenizer(enc.tokenizer), text_encoder=PipelineTextEncoder(enc),
                               vae=tiny_vae(), transformer=model, scheduler=DPMSolverMultistepScheduler())
    ts = timesteps_of(pipe.scheduler, STEPS)

    def run():
        return pipe(["the digit seven", "a 3"], num_inference_steps=STEPS, guidance_scale=4.0,
                    use_resolution_binning=False, max_sequence_length=8, height=16, width=16,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    ref = run()
    pipe.transformer = l2c.compile_schedule(model, l2c.Schedule.full(model, ts))
    assert rel_err(torch.tensor(run()), torch.tensor(ref)) < ROUNDING
    from l2c_kernels.schedules import tgate

    sched = tgate(model, ts, gate_step=2, sp_interval=1, fi_interval=1)
    pipe.transformer = l2c.compile_schedule(model, sched)
    cached = run()
    pipe.transformer = HookTransformer(model, sched)  # CFG-mean cross-attention cache, by hooks
    hooked = run()
    assert cached.shape == ref.shape and rel_err(torch.tensor(cached), torch.tensor(hooked)) < ROUNDING
    # the gate did change the images (measured 2.9e-5: this tiny model's cross-attention is weak and the VAE
    # shrinks differences; tests/test_tgate.py checks T-GATE against the hook reference on the latents)
    assert rel_err(torch.tensor(cached), torch.tensor(ref)) > 1e-5
