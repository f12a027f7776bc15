"""Per-step latency of compile_schedule's module vs the original diffusers model.

A 12-block DiT of the bundled dit-digits architecture (random weights: speed does not depend
on them), a CFG batch, 20 steps. Schedules remove 0%, 25%, 50% and 75% of the branch
computations (whole steps reused, FORA-like), and the measured speedup is put next to the
ideal speedup implied by the branch FLOPs removed. Everything is measured in one process,
interleaved step by step, as the mean over the steps of each step's median over repeated generations.

    python bench/bench_compile_schedule.py            # CPU, writes bench/results/compile_schedule_cpu.{json,md}
    python bench/bench_compile_schedule.py --device cuda --dtype bf16 --xl   # DiT-XL/2 shape on a GPU
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
from l2c_kernels.models import configs  # noqa: E402

REMOVE_EVERY = {0.0: None, 0.25: (4, {3}), 0.5: (2, {1}), 0.75: (4, {1, 2, 3})}


def make_schedule(model, timesteps, removed):
    nb = len(model.transformer_blocks)
    rule = REMOVE_EVERY[removed]
    plan = []
    for i in range(len(timesteps)):
        reuse = rule is not None and i > 0 and (i % rule[0]) in rule[1]
        plan.append(["RR" if reuse else "CC"] * nb)
    ad = l2c.adapters.adapter_for(model)
    return l2c.Schedule(timesteps=timesteps, plan=plan, branches=["attn1", "ff"], num_blocks=nb,
                        model_class=type(model).__name__, method=f"uniform-{int(removed * 100)}",
                        branch_flops=ad.branch_flops(model))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_generation(fn, x, labels, timesteps, device):
    sync(device)
    t0 = time.perf_counter()
    for t in timesteps:
        fn(x, timestep=torch.full((x.shape[0],), t, device=device), class_labels=labels)
    sync(device)
    return (time.perf_counter() - t0) / len(timesteps)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--batch", type=int, default=32, help="transformer batch (CFG: 2 x images)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--xl", action="store_true", help="DiT-XL/2 shape (28 blocks, hidden 1152, 256 tokens)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)[args.dtype]

    from diffusers import DDIMScheduler, DiTTransformer2DModel

    cfg = dict(configs.DIT_DIGITS)
    if args.xl:
        cfg.update(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                   sample_size=32, norm_eps=1e-5)
    torch.manual_seed(0)
    model = DiTTransformer2DModel(**cfg).to(device=device, dtype=dtype).eval().requires_grad_(False)
    sch = DDIMScheduler(**{k: v for k, v in configs.NOISE_SCHEDULE.items() if k != "clip_sample_range"})
    sch.set_timesteps(args.steps)
    timesteps = [int(t) for t in sch.timesteps]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"], generator=g)
    x = x.to(device=device, dtype=dtype)
    labels = torch.randint(0, 10, (args.batch,), generator=g).to(device)

    runners = {"original": model}
    scheds = {}
    for removed in REMOVE_EVERY:
        s = make_schedule(model, timesteps, removed)
        scheds[removed] = s
        runners[f"compiled {int(removed * 100)}%"] = l2c.compile_schedule(model, s)
    step_times = {k: [[] for _ in timesteps] for k in runners}  # runner -> step -> seconds of each repeat
    names = list(runners)
    with torch.no_grad():
        for name, fn in runners.items():  # warm-up (and CUDA graph capture)
            run_generation(fn, x, labels, timesteps, device)
        # Interleaved step by step: at every step each runner makes its call, in a rotating order, so
        # that drifts in machine speed (shared CPUs vary by tens of percent over seconds) hit all alike.
        # Every compiled module tracks its own steps, so the interleaving does not disturb them.
        for r in range(args.repeats):
            for i, t in enumerate(timesteps):
                k = (r * len(timesteps) + i) % len(names)
                for name in names[k:] + names[:k]:
                    step_times[name][i].append(run_generation(runners[name], x, labels, [t], device))
    # ms/step of a runner: the sum over steps of each step's median over the repeats, / number of steps
    med = {k: sum(statistics.median(v) for v in per) / len(timesteps) for k, per in step_times.items()}
    # per-repeat generation times, for the spread
    times = {k: [sum(per[i][r] for i in range(len(timesteps))) / len(timesteps) for r in range(args.repeats)]
             for k, per in step_times.items()}
    rows = []
    # FLOPs the calls really execute over one generation (torch.utils.flop_counter: matmuls, convolutions,
    # attention), so the whole model's work counts, not only the branches
    from torch.utils.flop_counter import FlopCounterMode

    def generation_flops(fn) -> int:
        if hasattr(fn, "reset"):
            fn.reset()
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            run_generation(fn, x, labels, timesteps, device)
        return fc.get_total_flops()

    flops_original = generation_flops(model)
    for removed, s in scheds.items():
        name = f"compiled {int(removed * 100)}%"
        speed = med["original"] / med[name]
        ideal = 1.0 / (1.0 - s.flops_removed_fraction())
        ideal_whole = flops_original / generation_flops(runners[name])
        rows.append(dict(schedule=name, branch_flops_removed=round(s.flops_removed_fraction(), 4),
                         ideal_speedup_whole_model=round(ideal_whole, 3),
                         measured_over_ideal_whole_model=round(speed / ideal_whole, 3),
                         step_ms=round(1e3 * med[name], 3), speedup_vs_original=round(speed, 3),
                         ideal_speedup=round(ideal, 3), measured_over_ideal=round(speed / ideal, 3),
                         spread_ms=[round(1e3 * min(times[name]), 3), round(1e3 * max(times[name]), 3)],
                         repeats=len(times[name])))
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({args.threads} threads)"
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    result = dict(benchmark="compile_schedule per-step latency", date=str(date.today()), device=dev_name,
                  torch=torch.__version__, triton=triton_version, dtype=args.dtype, batch=args.batch,
                  steps=args.steps, repeats=args.repeats, model="DiT-XL/2 shape" if args.xl else "dit-digits shape",
                  blocks=cfg["num_layers"], hidden=cfg["num_attention_heads"] * cfg["attention_head_dim"],
                  tokens=(cfg["sample_size"] // cfg["patch_size"]) ** 2, backend=l2c.build_info(),
                  original_step_ms=round(1e3 * med["original"], 3), rows=rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"compile_schedule_{device.type}{'_xl' if args.xl else ''}_{args.dtype}"
    (out / f"{tag}.json").write_text(json.dumps(result, indent=1, default=str))
    md = [f"# compile_schedule vs original, {result['model']} ({result['blocks']} blocks, hidden {result['hidden']}, "
          f"{result['tokens']} tokens), batch {args.batch}, {args.dtype}",
          f"{dev_name}, torch {torch.__version__}, {date.today()}; {args.repeats} generations of {args.steps} steps, every step of every runner interleaved; ms/step = mean over steps of each step's median.",
          "", f"original: {result['original_step_ms']} ms/step", "",
          "`ideal (branches)` = 1 / (1 - branch FLOPs removed): every FLOP outside the branches (patch and "
          "timestep embeddings, adaLN projections, final layer) counted as free; `ideal (model)` = the "
          "original's FLOPs over the compiled module's, both counted with `torch.utils.flop_counter` over a "
          "whole generation.", "",
          "| schedule | branch FLOPs removed | ms/step | speedup | ideal (branches) | measured/ideal | "
          "ideal (model) | measured/ideal (model) |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['schedule']} | {100 * r['branch_flops_removed']:.0f}% | {r['step_ms']} | "
                  f"{r['speedup_vs_original']:.2f}x | {r['ideal_speedup']:.2f}x | {r['measured_over_ideal']:.2f} | "
                  f"{r['ideal_speedup_whole_model']:.2f}x | {r['measured_over_ideal_whole_model']:.2f} |")
    (out / f"{tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return result


if __name__ == "__main__":
    main()
