"""Learn and run a block-level cache schedule in an unmodified SD3 / Flux / Wan pipeline.

    python python/example_mmdit.py --family flux                 # tiny offline pipeline, random weights
    python python/example_mmdit.py --pipeline /path/to/FLUX.1-dev --height 1024 --width 1024 --steps 28

With ``--pipeline`` a local diffusers folder is loaded offline (``local_files_only``); without it the
tiny pipeline of ``tests/tiny_pipelines.py`` is built from configs (seconds on a CPU; its images
are noise, the timings and the mechanics are real). The script samples with full compute, learns a
schedule removing ``--budget`` of the block FLOPs, swaps in ``compile_schedule`` and samples again
from the same seed, then maps the schedule to another resolution by step index (flow-matching
samplers shift their timesteps with the image size; see ``Schedule.retimed``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import l2c_kernels as l2c  # noqa: E402
from l2c_kernels.sampling.mmdit_conditions import pipeline_timesteps  # noqa: E402

PROMPTS = ["a red fox in the snow", "the city at night"]


def load(args):
    if args.pipeline:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(args.pipeline, local_files_only=True,
                                                 torch_dtype=getattr(torch, args.dtype))
        return pipe.to(args.device), {}
    from tests.tiny_pipelines import BUILDERS, CALL_KW

    kw = dict(CALL_KW[args.family])
    return BUILDERS[args.family](), kw


def sample(pipe, steps, kw):
    t0 = time.perf_counter()
    out = pipe(prompt=PROMPTS, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
               output_type="latent", **kw)
    lat = out.frames if hasattr(out, "frames") else out.images
    return lat.float().cpu(), time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=["sd3", "flux", "wan"], default="flux", help="tiny pipeline to build")
    p.add_argument("--pipeline", help="a local StableDiffusion3 / Flux / Wan pipeline folder (offline)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--budget", type=float, default=0.4, help="fraction of block FLOPs to remove")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--iterations", type=int, default=8, help="router iterations")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()

    pipe, kw = load(args)
    pipe.set_progress_bar_config(disable=True)
    if args.height:
        kw["height"] = args.height
    if args.width:
        kw["width"] = args.width
    model = pipe.transformer
    sample(pipe, 2, kw)   # warm-up: lazy initialisation out of the timings
    full, t_full = sample(pipe, args.steps, kw)

    learn_kw = {k: kw[k] for k in ("height", "width", "guidance_scale", "max_sequence_length") if k in kw}
    sched = l2c.learn_schedule(pipe, num_inference_steps=args.steps, budget=args.budget, prompts=PROMPTS,
                               iterations=args.iterations, batch_size=2, progress=False, **learn_kw)
    print(sched.format_summary())
    pipe.transformer = l2c.compile_schedule(model, sched)
    fast, t_fast = sample(pipe, args.steps, kw)
    rel = float((fast - full).norm() / full.norm())
    print(f"{type(pipe).__name__}: full {t_full:.2f} s, cached {t_fast:.2f} s ({t_full / t_fast:.2f}x), "
          f"relative latent error {rel:.3f}")

    if type(pipe).__name__ != "WanPipeline":   # Wan's timesteps do not depend on the size
        other = dict(kw, height=2 * kw.get("height", 64), width=2 * kw.get("width", 64))
        ts, sampler = pipeline_timesteps(pipe, args.steps, height=other["height"], width=other["width"])
        pipe.transformer = l2c.compile_schedule(model, sched.retimed(ts, sampler))
        _, t_other = sample(pipe, args.steps, other)
        print(f"same schedule at {other['height']}x{other['width']} (mapped by step index): {t_other:.2f} s")
    pipe.transformer = model


if __name__ == "__main__":
    main()
