"""Per-step latency of compile_schedule at branch level on a Flux-shaped model, and the cost of splitting a
Flux single block's ``proj_out`` into its attention and MLP column blocks.

The model is the one of ``bench/bench_blocks.py`` (Flux.1-dev structure: 4 double + 8 single blocks, 3 heads
of 128 = hidden 384, RoPE 16/56/56, guidance embedding, 256 and 576 image + 64 text tokens by default, batch 1, fp32, random
weights). Unit FLOPs are counted on a real call (``measure_branch_flops``). Schedules:

- ``uniform r``: whole steps reuse every unit (FORA at branch level): 25 / 50 / 75% of the steps after the first;
- ``spread r``: every unit is reused at its own phase, ``(step + block + branch) mod k`` (so each step
  mixes computed and reused attention / MLP units): about 25 / 50 / 75% of the unit FLOPs.

Measured speedup (original ms/step over compiled) is put next to ``1 / (1 - unit FLOPs removed)``. All runners
are interleaved step by step in a rotating order; ms/step = mean over steps of each step's median.

The split: ``proj_out(cat(a, m))`` (one product, diffusers) vs ``a W_a^T + (m W_m^T + b)`` (two products, what
the runtime runs when a half is stored for later reuse), at this model's size and at Flux.1's width
(3072 / 12288) with 64 tokens.

Each measurement is made at two sizes (``--image-sides``, default 256 and 576 image tokens): a fully reused
step still runs the work outside the units (embeddings, adaLN gates, output layer), whose share of a step falls
as tokens grow (Flux.1-dev at 1024x1024 has 4096 image tokens); the table of computed vs reused steps shows it.

    python bench/bench_branches.py   # writes bench/results/compile_schedule_cpu_flux_branches.{json,md}
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import l2c_kernels as l2c  # noqa: E402
from l2c_kernels.adapters.mmdit_branches import branch_names  # noqa: E402
from l2c_kernels.runtime.branch_wrappers import measure_branch_flops  # noqa: E402

from flux_shaped import (FLUX_SHAPED, flux_shaped, interleaved_step_times, latency_rows,  # noqa: E402
                         load_average, timesteps_for)

PATTERNS = {0.25: (4, {3}), 0.5: (2, {1}), 0.75: (4, {1, 2, 3})}


def uniform(model, timesteps, r, ubf, names):
    k, drop = PATTERNS[r]
    mask = [[[not (i > 0 and i % k in drop)] * len(names)] * len(ubf) for i in range(len(timesteps))]
    return l2c.Schedule.from_mask(model, timesteps, mask, branches=names, unit_branch_flops=ubf,
                                  method=f"uniform-{int(100 * r)}")


def spread(model, timesteps, r, ubf, names):
    k, drop = PATTERNS[r]
    mask = [[[not (i > 0 and (i + b + j) % k in drop) for j in range(len(names))] for b in range(len(ubf))]
            for i in range(len(timesteps))]
    return l2c.Schedule.from_mask(model, timesteps, mask, branches=names, unit_branch_flops=ubf,
                                  method=f"spread-{int(100 * r)}")


def median_ms(fn, repeats):
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(out)


def split_cost(tokens, dim, mlp, repeats):
    g = torch.Generator().manual_seed(0)
    a, m = torch.randn(1, tokens, dim, generator=g), torch.randn(1, tokens, mlp, generator=g)
    w, b = torch.randn(dim, dim + mlp, generator=g) / (dim + mlp) ** 0.5, torch.zeros(dim)
    fused = median_ms(lambda: F.linear(torch.cat([a, m], dim=2), w, b), repeats)
    split = median_ms(lambda: F.linear(a, w[:, :dim]) + F.linear(m, w[:, dim:], b), repeats)
    attn_only = median_ms(lambda: F.linear(a, w[:, :dim]), repeats)
    mlp_only = median_ms(lambda: F.linear(m, w[:, dim:], b), repeats)
    return dict(tokens=tokens, dim=dim, mlp_hidden=mlp, fused_ms=round(fused, 3), split_ms=round(split, 3),
                split_over_fused=round(split / fused, 3), attention_half_ms=round(attn_only, 3),
                mlp_half_ms=round(mlp_only, 3))


def measure_size(img_side: int, txt: int, steps: int, repeats: int) -> dict:
    """Every schedule at one model size: latency rows, and the uniform 75% runner's computed vs fully reused steps."""
    model, call = flux_shaped(img_side, txt)
    timesteps = timesteps_for(steps)
    cond = {k: v for k, v in call.inputs.items() if k != "hidden_states"}
    x = call.inputs["hidden_states"]

    names = branch_names(model)
    ubf = measure_branch_flops(model, hidden_states=x, timestep=torch.full((1,), 1.0), **cond)
    scheds = {"0%": l2c.Schedule.full(model, timesteps, branches=names)}
    scheds["0%"].unit_branch_flops = ubf
    for r in PATTERNS:
        scheds[f"uniform {int(100 * r)}%"] = uniform(model, timesteps, r, ubf, names)
    for r in PATTERNS:
        scheds[f"spread {int(100 * r)}%"] = spread(model, timesteps, r, ubf, names)
    runners = {"original": model, **{f"compiled {k}": l2c.compile_schedule(model, s) for k, s in scheds.items()}}
    per_step: dict = {}
    med, _ = interleaved_step_times(runners, timesteps, call, repeats, step_medians=per_step)
    rows = latency_rows(scheds, runners, med, timesteps, call, "unit_flops_removed")
    # where the 75% row loses against its ideal: its computed steps vs the original's, and a fully reused step
    k, drop = PATTERNS[0.75]
    u = per_step["compiled uniform 75%"]
    computed = [i for i in range(steps) if not (i > 0 and i % k in drop)]
    reused = [i for i in range(steps) if i not in computed]
    orig = statistics.mean(per_step["original"])
    split = dict(original_step_ms=round(1e3 * orig, 3),
                 computed_step_ms=round(1e3 * statistics.mean(u[i] for i in computed), 3),
                 reused_step_ms=round(1e3 * statistics.mean(u[i] for i in reused), 3))
    split["reused_over_original"] = round(split["reused_step_ms"] / split["original_step_ms"], 4)
    return dict(image_tokens=img_side * img_side, text_tokens=txt, unit_branch_flops=ubf, branches=names,
                original_step_ms=round(1e3 * med["original"], 3), rows=rows, uniform_75_steps=split)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--image-sides", type=int, nargs="+", default=[16, 24],
                    help="packed latent sides, one model size each: image tokens = side^2")
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    txt = args.text_tokens
    sizes = [measure_size(side, txt, args.steps, args.repeats) for side in args.image_sides]
    splits = [split_cost(96, 384, 1536, 20), split_cost(64, 3072, 12288, 3)]
    result = dict(benchmark="compile_schedule branch level (SD3 / Flux units), per-step latency",
                  load_average_at_end=load_average(),
                  date=str(date.today()), device=f"CPU ({args.threads} threads)", torch=torch.__version__,
                  dtype="fp32", batch=1, steps=args.steps, repeats=args.repeats,
                  model="FluxTransformer2DModel, Flux.1-dev structure", config=FLUX_SHAPED,
                  backend=l2c.build_info(), sizes=sizes, proj_out_split=splits)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile_schedule_cpu_flux_branches.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [f"# compile_schedule at branch level vs original, Flux-shaped model (4 double + 8 single blocks, hidden 384, "
          f"{txt} text tokens), batch 1, fp32",
          f"CPU ({args.threads} threads), torch {torch.__version__}, {date.today()}; at each size {args.repeats} "
          f"generations of {args.steps} steps, every step of every runner interleaved; ms/step = mean over steps of each "
          f"step's median. Load average at the end: {result['load_average_at_end']} (valid only on an otherwise idle "
          f"machine).", "",
          "ideal = 1 / (1 - unit FLOPs removed) (everything outside the units counted as free); ideal (model) = the "
          "original's FLOPs over the compiled module's, both counted with `torch.utils.flop_counter` over a whole "
          "generation (the per-block adaLN modulations, embeddings and output layers run at every step)."]
    for sz in sizes:
        d, s = sz["unit_branch_flops"][0], sz["unit_branch_flops"][-1]
        md += ["", f"## {sz['image_tokens']} image + {sz['text_tokens']} text tokens: original "
                   f"{sz['original_step_ms']} ms/step", "",
               f"Unit FLOPs counted on a real call (MFLOP): double block attn1 {d[0] / 1e6:.1f}, ff {d[1] / 1e6:.1f}, "
               f"ff_context {d[2] / 1e6:.1f}; single block attn1 {s[0] / 1e6:.1f}, ff {s[1] / 1e6:.1f}.", "",
               "| schedule | unit FLOPs removed | ms/step | speedup | ideal | measured/ideal | ideal (model) | "
               "measured/ideal (model) |", "|---|---|---|---|---|---|---|---|"]
        for r in sz["rows"]:
            md.append(f"| {r['schedule']} | {100 * r['unit_flops_removed']:.1f}% | {r['step_ms']} | "
                      f"{r['speedup_vs_original']:.2f}x | {r['ideal_speedup']:.2f}x | {r['measured_over_ideal']:.2f} | "
                      f"{r['ideal_speedup_whole_model']:.2f}x | {r['measured_over_ideal_whole_model']:.2f} |")
    md += ["", "Where uniform 75% loses against its ideal: a fully reused step still runs the embeddings, every block's "
               "adaLN gates (the gate rows only), the cached outputs' gated adds and the output layer; that fixed "
               "work is a smaller share of a step as the token count grows (means over steps of each step's median):",
           "", "| image tokens | original ms/step | computed step ms | fully reused step ms | reused / original |",
           "|---|---|---|---|---|"]
    for sz in sizes:
        u = sz["uniform_75_steps"]
        md.append(f"| {sz['image_tokens']} | {u['original_step_ms']} | {u['computed_step_ms']} | "
                  f"{u['reused_step_ms']} | {u['reused_over_original']} |")
    md += ["", "Flux single block `proj_out`: one product on `cat(a, m)` vs the two column blocks (ms, median):", "",
           "| tokens | dim | mlp | fused | split | split/fused | attention half | MLP half |", "|---|---|---|---|---|---|---|---|"]
    for sp in splits:
        md.append(f"| {sp['tokens']} | {sp['dim']} | {sp['mlp_hidden']} | {sp['fused_ms']} | {sp['split_ms']} | "
                  f"{sp['split_over_fused']} | {sp['attention_half_ms']} | {sp['mlp_half_ms']} |")
    (out / "compile_schedule_cpu_flux_branches.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
