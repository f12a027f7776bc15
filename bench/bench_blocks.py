"""Per-step latency of compile_schedule at block level on a Flux-shaped model vs the original model.

A ``FluxTransformer2DModel`` with Flux.1-dev's structure (double-stream then single-stream blocks in
the published 1:2 ratio, head dim 128, RoPE axes 16/56/56, guidance embedding) sized for 2 CPU cores:
4 + 8 blocks, 3 heads (hidden 384), 256 image tokens (a 32x32 latent packed 2x2) and 64 text tokens,
T5 width 4096 -> 1024, batch 1 (Flux.1-dev has no CFG batch). Random weights: speed does not depend on
them. The token counts keep the work outside the blocks (embeddings, final projection: small matrix
products that read their weights for a handful of rows) near its share in the real model; with fewer
tokens it weighs more than its FLOPs say (``--image-side 8 --text-tokens 32``: see bench/NOTES.md).

Schedules remove 0%, 25%, 50% and 75% of the block FLOPs (FORA-like: whole steps reuse every block), plus
50% spread over the blocks (every step after the first reuses every other block, alternating). Block FLOPs
are counted on a real call (``measure_block_flops``). Measured speedup is put next to the ideal ones:
``1 / (1 - block FLOPs removed)`` and the whole model's counted FLOPs over the compiled module's. All runners
are interleaved step by step in a rotating order; ms/step = mean over steps of each step's median.

    nice -n 10 python bench/bench_blocks.py        # writes bench/results/compile_schedule_cpu_flux.{json,md}
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import l2c_kernels as l2c  # noqa: E402
from l2c_kernels.runtime.block_flops import _CUSTOM, measure_block_flops  # noqa: E402

FLUX_SHAPED = dict(patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=128,
                   num_attention_heads=3, joint_attention_dim=1024, pooled_projection_dim=768, guidance_embeds=True,
                   axes_dims_rope=[16, 56, 56])
REMOVE_EVERY = {0.0: None, 0.25: (4, {3}), 0.5: (2, {1}), 0.75: (4, {1, 2, 3})}


def step_schedule(model, timesteps, removed, flops):
    rule = REMOVE_EVERY[removed]
    nb = len(flops)
    mask = [[not (rule is not None and i > 0 and (i % rule[0]) in rule[1])] * nb for i in range(len(timesteps))]
    return l2c.Schedule.from_mask(model, timesteps, mask, branches=["block"], unit_flops=flops,
                                  method=f"uniform-{int(removed * 100)}")


def spread_schedule(model, timesteps, flops):
    nb = len(flops)
    mask = [[i == 0 or (i + b) % 2 == 0 for b in range(nb)] for i in range(len(timesteps))]
    return l2c.Schedule.from_mask(model, timesteps, mask, branches=["block"], unit_flops=flops, method="spread-50")


def _load() -> str:
    try:
        import os

        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "?"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="a multiple of 4")
    ap.add_argument("--image-side", type=int, default=16, help="packed latent side: image tokens = side^2")
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--tag", default="", help="suffix of the result files (compile_schedule_cpu_flux_<tag>)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import FluxTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**FLUX_SHAPED).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():  # diffusers zero-initialises some projections; speed does not care, fine
            p.normal_(0, 0.02)
    img_side, txt = args.image_side, args.text_tokens
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, img_side * img_side, 64, generator=g)
    ids = torch.zeros(img_side, img_side, 3)
    ids[..., 1] = torch.arange(img_side)[:, None]
    ids[..., 2] = torch.arange(img_side)[None, :]
    cond = dict(encoder_hidden_states=torch.randn(1, txt, 1024, generator=g),
                pooled_projections=torch.randn(1, 768, generator=g), img_ids=ids.reshape(-1, 3),
                txt_ids=torch.zeros(txt, 3), guidance=torch.full((1,), 3.5), return_dict=False)
    timesteps = [int(round(1000 - i * 950 / (args.steps - 1))) for i in range(args.steps)]

    def call(fn, t):
        return fn(hidden_states=x, timestep=torch.full((1,), t / 1000.0), **cond)

    flops = measure_block_flops(model, hidden_states=x, timestep=torch.full((1,), 1.0), **cond)
    scheds = {f"{int(r * 100)}%": step_schedule(model, timesteps, r, flops) for r in REMOVE_EVERY}
    scheds["50% spread"] = spread_schedule(model, timesteps, flops)
    runners = {"original": model}
    for k, s in scheds.items():
        runners[f"compiled {k}"] = l2c.compile_schedule(model, s)
    names = list(runners)
    step_times = {k: [[] for _ in timesteps] for k in runners}
    with torch.no_grad():
        for fn in runners.values():  # warm-up
            for t in timesteps:
                call(fn, t)
        for r in range(args.repeats):
            for i, t in enumerate(timesteps):
                k = (r * len(timesteps) + i) % len(names)
                for name in names[k:] + names[:k]:
                    t0 = time.perf_counter()
                    call(runners[name], t)
                    step_times[name][i].append(time.perf_counter() - t0)
    med = {k: sum(statistics.median(v) for v in per) / len(timesteps) for k, per in step_times.items()}
    times = {k: [sum(per[i][r] for i in range(len(timesteps))) / len(timesteps) for r in range(args.repeats)]
             for k, per in step_times.items()}

    def generation_flops(fn) -> int:
        if hasattr(fn, "reset"):
            fn.reset()
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_CUSTOM) as fc:
            for t in timesteps:
                call(fn, t)
        return fc.get_total_flops()

    flops_original = generation_flops(model)
    rows = []
    for k, s in scheds.items():
        name = f"compiled {k}"
        speed = med["original"] / med[name]
        f = s.flops_removed_fraction()
        ideal = 1.0 / (1.0 - f)
        ideal_whole = flops_original / generation_flops(runners[name])
        rows.append(dict(schedule=name, block_flops_removed=round(f, 4), step_ms=round(1e3 * med[name], 3),
                         speedup_vs_original=round(speed, 3), ideal_speedup=round(ideal, 3),
                         measured_over_ideal=round(speed / ideal, 3), ideal_speedup_whole_model=round(ideal_whole, 3),
                         measured_over_ideal_whole_model=round(speed / ideal_whole, 3),
                         spread_ms=[round(1e3 * min(times[name]), 3), round(1e3 * max(times[name]), 3)]))
    result = dict(benchmark="compile_schedule block level, per-step latency", date=str(date.today()),
                  device=f"CPU ({args.threads} threads)", load_average=_load(), torch=torch.__version__, dtype="fp32", batch=1,
                  steps=args.steps, repeats=args.repeats, model="FluxTransformer2DModel, Flux.1-dev structure",
                  config=FLUX_SHAPED, image_tokens=img_side * img_side, text_tokens=txt,
                  block_flops=flops, backend=l2c.build_info(),
                  original_step_ms=round(1e3 * med["original"], 3), rows=rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "compile_schedule_cpu_flux" + (args.tag and f"_{args.tag}")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [f"# compile_schedule at block level vs original, Flux-shaped model (4 double + 8 single blocks, hidden 384, "
          f"{img_side * img_side} image + {txt} text tokens), batch 1, fp32",
          f"CPU ({args.threads} thread{'s' * (args.threads > 1)}, load average {_load()}), torch {torch.__version__}, {date.today()}; {args.repeats} generations of "
          f"{args.steps} steps, every step of every runner interleaved; ms/step = mean over steps of each step's median.",
          "", f"original: {result['original_step_ms']} ms/step", "",
          f"Block FLOPs counted on a real call: double-stream {flops[0] / 1e6:.0f} MFLOP, single-stream "
          f"{flops[-1] / 1e6:.0f} MFLOP per block. `ideal (blocks)` = 1 / (1 - block FLOPs removed): everything outside "
          f"the blocks counted as free; `ideal (model)` = the original's FLOPs over the compiled module's, both counted "
          f"with `torch.utils.flop_counter` over a whole generation.", "",
          "| schedule | block FLOPs removed | ms/step | speedup | ideal (blocks) | measured/ideal | ideal (model) | "
          "measured/ideal (model) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['schedule']} | {100 * r['block_flops_removed']:.0f}% | {r['step_ms']} | "
                  f"{r['speedup_vs_original']:.2f}x | {r['ideal_speedup']:.2f}x | {r['measured_over_ideal']:.2f} | "
                  f"{r['ideal_speedup_whole_model']:.2f}x | {r['measured_over_ideal_whole_model']:.2f} |")
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
