"""Compiled transformers dropped into unmodified diffusers pipelines (tiny configs, nothing downloaded)."""
from __future__ import annotations

import torch

import l2c_kernels as l2c
from l2c_kernels.models.pipelines import PipelineTextEncoder, PipelineTokenizer
from l2c_kernels.models.text_encoder import DigitTextEncoder
from tests.tiny_models import rel_err, tiny_dit, tiny_pixart

STEPS = 4


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
    assert rel_err(torch.tensor(full), torch.tensor(ref)) < 1e-4
    assert pipe.transformer.current_step == STEPS - 1
    mask = [[[True, True]] * 3] + [[[s % 2 == 0, True]] * 3 for s in range(1, STEPS)]
    pipe.transformer = l2c.compile_schedule(model, l2c.Schedule.from_mask(model, ts, mask))
    cached = run()
    assert cached.shape == ref.shape and 0 < rel_err(torch.tensor(cached), torch.tensor(ref)) < 0.5
    again = run()  # a second generation restarts the schedule and gives the same images
    assert (again == cached).all()


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
    assert rel_err(torch.tensor(run()), torch.tensor(ref)) < 1e-4
    from l2c_kernels.schedules import tgate

    pipe.transformer = l2c.compile_schedule(model, tgate(model, ts, gate_step=2, sp_interval=1, fi_interval=1))
    cached = run()
    assert cached.shape == ref.shape and rel_err(torch.tensor(cached), torch.tensor(ref)) > 0
