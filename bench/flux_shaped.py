"""The Flux-shaped model the CPU latency benchmarks time (``bench_blocks.py``, ``bench_branches.py``), and their
interleaved per-step timing.

A ``FluxTransformer2DModel`` with Flux.1-dev's structure (double-stream then single-stream blocks in the published
1:2 ratio, head dim 128, RoPE axes 16/56/56, guidance embedding) sized for 2 CPU cores: 4 + 8 blocks, 3 heads
(hidden 384), T5 width 4096 -> 1024, batch 1 (Flux.1-dev has no CFG batch), random weights (speed does not depend
on them).
"""
from __future__ import annotations

import os
import statistics
import time

import torch

FLUX_SHAPED = dict(patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=128,
                   num_attention_heads=3, joint_attention_dim=1024, pooled_projection_dim=768, guidance_embeds=True,
                   axes_dims_rope=[16, 56, 56])


def flux_shaped(image_side: int, text_tokens: int):
    """``(model, call)``: the model and ``call(fn, t)``, one transformer call of ``fn`` (the model or a compiled
    module) at timestep ``t`` (0-1000) on fixed inputs: ``image_side**2`` packed image tokens, ``text_tokens``."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**FLUX_SHAPED).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():  # diffusers zero-initialises some projections; speed does not care, fine
            p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, image_side * image_side, 64, generator=g)
    ids = torch.zeros(image_side, image_side, 3)
    ids[..., 1] = torch.arange(image_side)[:, None]
    ids[..., 2] = torch.arange(image_side)[None, :]
    cond = dict(hidden_states=x, encoder_hidden_states=torch.randn(1, text_tokens, 1024, generator=g),
                pooled_projections=torch.randn(1, 768, generator=g), img_ids=ids.reshape(-1, 3),
                txt_ids=torch.zeros(text_tokens, 3), guidance=torch.full((1,), 3.5), return_dict=False)

    def call(fn, t):
        return fn(timestep=torch.full((1,), t / 1000.0), **cond)

    call.inputs = cond
    return model, call


def timesteps_for(steps: int) -> list[int]:
    return [int(round(1000 - i * 950 / (steps - 1))) for i in range(steps)]


def interleaved_step_times(runners: dict, timesteps, call, repeats: int, step_medians: dict | None = None):
    """Every step of every runner interleaved, in a rotating order, after a warm-up generation of each.

    Returns ``(ms, per_generation)``: ``ms[name]`` = mean over steps of each step's median (seconds), and
    ``per_generation[name]`` = each repeat's mean step time (seconds). ``step_medians``, if given, is filled with
    each runner's per-step medians (seconds, one per timestep)."""
    names = list(runners)
    step_times = {k: [[] for _ in timesteps] for k in runners}
    with torch.no_grad():
        for fn in runners.values():
            for t in timesteps:
                call(fn, t)
        for r in range(repeats):
            for i, t in enumerate(timesteps):
                k = (r * len(timesteps) + i) % len(names)
                for name in names[k:] + names[:k]:
                    t0 = time.perf_counter()
                    call(runners[name], t)
                    step_times[name][i].append(time.perf_counter() - t0)
    if step_medians is not None:
        step_medians.update({k: [statistics.median(v) for v in per] for k, per in step_times.items()})
    med = {k: sum(statistics.median(v) for v in per) / len(timesteps) for k, per in step_times.items()}
    per_gen = {k: [sum(per[i][r] for i in range(len(timesteps))) / len(timesteps) for r in range(repeats)]
               for k, per in step_times.items()}
    return med, per_gen


def load_average() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "?"


def generation_flops(fn, timesteps, call) -> int:
    """FLOPs of one generation of ``fn`` (the model or a compiled module, reset first), counted by
    ``torch.utils.flop_counter`` with the package's custom ops mapped (what really ran)."""
    from torch.utils.flop_counter import FlopCounterMode

    from l2c_kernels.runtime.block_flops import _CUSTOM

    if hasattr(fn, "reset"):
        fn.reset()
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_CUSTOM) as fc:
        for t in timesteps:
            call(fn, t)
    return fc.get_total_flops()


def latency_rows(scheds: dict, runners: dict, med: dict, timesteps, call, removed_key: str) -> list[dict]:
    """One row per schedule ``k`` (runner ``"compiled k"``): ms/step, speedup over ``runners["original"]``, the
    ideal speedup from the schedule's FLOPs removed (``removed_key``) and from counted whole-generation FLOPs."""
    flops_original = generation_flops(runners["original"], timesteps, call)
    rows = []
    for k, s in scheds.items():
        name = f"compiled {k}"
        speed = med["original"] / med[name]
        f = s.flops_removed_fraction()
        ideal = 1.0 / (1.0 - f)
        ideal_whole = flops_original / generation_flops(runners[name], timesteps, call)
        rows.append({"schedule": name, removed_key: round(f, 4), "step_ms": round(1e3 * med[name], 3),
                     "speedup_vs_original": round(speed, 3), "ideal_speedup": round(ideal, 3),
                     "measured_over_ideal": round(speed / ideal, 3), "ideal_speedup_whole_model": round(ideal_whole, 3),
                     "measured_over_ideal_whole_model": round(speed / ideal_whole, 3)})
    return rows
