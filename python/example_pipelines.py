"""Cached sampling inside unmodified diffusers pipelines, on the bundled models.

    python python/example_pipelines.py

Builds a ``DiTPipeline`` and a ``PixArtAlphaPipeline`` around the bundled digits models, samples
with full compute, then swaps in ``compile_schedule`` modules (a FORA-style schedule for the DiT,
T-GATE for PixArt) and samples again from the same generator seed.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import l2c_kernels as l2c  # noqa: E402
from l2c_kernels import metrics, models, schedules  # noqa: E402
from l2c_kernels.models.pipelines import dit_pipeline, pixart_pipeline  # noqa: E402


def timesteps(pipe, steps):
    pipe.scheduler.set_timesteps(steps)
    return [int(t) for t in pipe.scheduler.timesteps]


def run(pipe, **kw):
    t0 = time.perf_counter()
    out = pipe(generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images
    return out, time.perf_counter() - t0


def main():
    steps = 25
    dit = models.load("dit-digits")
    pipe = dit_pipeline(dit)
    full, t_full = run(pipe, class_labels=list(range(10)), num_inference_steps=steps, guidance_scale=dit.recommended_cfg)
    pipe.transformer = l2c.compile_schedule(dit.transformer, schedules.uniform(dit.transformer, timesteps(pipe, steps), 2))
    fast, t_fast = run(pipe, class_labels=list(range(10)), num_inference_steps=steps, guidance_scale=dit.recommended_cfg)
    print(f"DiTPipeline: full {t_full:.2f} s, FORA every 2nd step {t_fast:.2f} s "
          f"({t_full / t_fast:.2f}x), PSNR {metrics.psnr(fast * 2 - 1, full * 2 - 1):.1f} dB")

    pix = models.load("pixart-digits")
    pipe = pixart_pipeline(pix, scheduler="dpm++")
    prompts = [f"the digit {w}" for w in ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]]
    kw = dict(num_inference_steps=steps, guidance_scale=pix.recommended_cfg, use_resolution_binning=False,
              max_sequence_length=8)
    full, t_full = run(pipe, prompt=prompts, **kw)
    sched = schedules.tgate(pix.transformer, timesteps(pipe, steps), gate_step=15, sp_interval=3)
    pipe.transformer = l2c.compile_schedule(pix.transformer, sched)
    fast, t_fast = run(pipe, prompt=prompts, **kw)
    print(f"PixArtAlphaPipeline: full {t_full:.2f} s, T-GATE (gate 15, CFG collapse) {t_fast:.2f} s "
          f"({t_full / t_fast:.2f}x), PSNR {metrics.psnr(fast * 2 - 1, full * 2 - 1):.1f} dB")


if __name__ == "__main__":
    main()
