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
import sys
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import l2c_kernels as l2c  # noqa: E402
from l2c_kernels.runtime.block_flops import measure_block_flops  # noqa: E402

from flux_shaped import (FLUX_SHAPED, flux_shaped, interleaved_step_times, latency_rows,  # noqa: E402
                         load_average, timesteps_for)

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
    img_side, txt = args.image_side, args.text_tokens
    model, call = flux_shaped(img_side, txt)
    timesteps = timesteps_for(args.steps)
    cond = {k: v for k, v in call.inputs.items() if k != "hidden_states"}
    x = call.inputs["hidden_states"]

    flops = measure_block_flops(model, hidden_states=x, timestep=torch.full((1,), 1.0), **cond)
    scheds = {f"{int(r * 100)}%": step_schedule(model, timesteps, r, flops) for r in REMOVE_EVERY}
    scheds["50% spread"] = spread_schedule(model, timesteps, flops)
    runners = {"original": model}
    for k, s in scheds.items():
        runners[f"compiled {k}"] = l2c.compile_schedule(model, s)
    med, times = interleaved_step_times(runners, timesteps, call, args.repeats)

    rows = latency_rows(scheds, runners, med, timesteps, call, "block_flops_removed")
    for r in rows:
        r["spread_ms"] = [round(1e3 * min(times[r["schedule"]]), 3), round(1e3 * max(times[r["schedule"]]), 3)]
    result = dict(benchmark="compile_schedule block level, per-step latency", date=str(date.today()),
                  device=f"CPU ({args.threads} threads)", load_average=load_average(), torch=torch.__version__, dtype="fp32", batch=1,
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
          f"CPU ({args.threads} thread{'s' * (args.threads > 1)}, load average {load_average()}), torch {torch.__version__}, {date.today()}; {args.repeats} generations of "
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
