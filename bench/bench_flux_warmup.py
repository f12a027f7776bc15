"""Warm-up schedules on flux-digits against the learned schedules, quality only: FORA every 2 steps with and without
the linear forecast, the first ``w`` steps computed then every ``k``-th (w = 3, 5; k = 2, 3; linear forecast:
diffusers TaylorSeer's structure) and ``learn_schedule`` at each budget (batch 2, 8 calibration samples); PSNR / SSIM
against full compute on the comparison's 10 digits (seed 100) and 40 more (seed 102). Notes: bench/NOTES.md.

    python bench/bench_flux_warmup.py --steps 50     # writes flux_warmup_50.{json,md}
"""
from __future__ import annotations

import time

import harness
import torch

import l2c_kernels as l2c
from l2c_kernels import metrics, models
from l2c_kernels.models import flux_digits, load

EVAL = ((100, 10), (102, 40))   # (noise seed, digits): the comparison's set and its re-check set


def warm_up(model, timesteps, w: int, k: int, forecast: str) -> l2c.Schedule:
    nb = len(l2c.Schedule.full(model, timesteps).plan[0])
    mask = [[[i < w or (i - w) % k == 0]] * nb for i in range(len(timesteps))]
    return l2c.Schedule.from_mask(model, timesteps, mask, forecast=forecast)


def main(argv=None):
    ap = harness.parser(__doc__, threads=1)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.35, 0.5])
    ap.add_argument("--cfg", type=float, default=7.0)
    a = harness.parse(ap, argv)
    torch.set_num_threads(a.threads)
    bundle = load("flux-digits")
    model = bundle.transformer
    ts = flux_digits.timesteps_for(bundle, a.steps)

    def sample(seed, n, tr=None):
        return models.sample(bundle, labels=[i % 10 for i in range(n)], steps=a.steps, cfg=a.cfg, seed=seed,
                             transformer=tr, progress=False)

    refs = {seed: sample(seed, n) for seed, n in EVAL}
    entries = [("FORA every 2", warm_up(model, ts, 0, 2, "none")),
               ("FORA every 2, linear", warm_up(model, ts, 0, 2, "linear"))]
    entries += [(f"warm-up {w}, every {k}, linear", warm_up(model, ts, w, k, "linear")) for w in (3, 5) for k in (2, 3)]
    learn_s = {}
    for b in a.budgets:
        t0 = time.time()
        s = l2c.learn_schedule(bundle, a.steps, b, cfg=a.cfg, scheduler="flow-euler", batch_size=2,
                               calibration_samples=8, progress=False)
        learn_s[b] = round(time.time() - t0)
        entries.append((f"learned {100 * b:.0f}%" + (f", {s.forecast}" if s.forecast != "none" else ""), s))
    rows = []
    for label, s in entries:
        fast = l2c.compile_schedule(model, s)
        row = dict(schedule=label, flops_removed=round(s.flops_removed_fraction(), 4))
        for seed, n in EVAL:
            img = sample(seed, n, fast)
            row.update({f"psnr_{n}": round(metrics.psnr(img, refs[seed]), 2),
                        f"ssim_{n}": round(metrics.ssim(img, refs[seed]), 4)})
        rows.append(row)
        harness.log(row)
    res = dict(benchmark="warm-up schedules on flux-digits", model="flux-digits", steps=a.steps, cfg=a.cfg,
               sampler="flow-euler", eval=[dict(seed=s, digits=n) for s, n in EVAL], learn_seconds=learn_s, rows=rows)
    md = [f"# Warm-up schedules on flux-digits, Euler flow matching {a.steps} steps, CFG {a.cfg}", "",
          f"{harness.describe(harness.meta())}. PSNR / SSIM against full compute from the same noise: the comparison's "
          f"10 digits (seed 100) and 40 more (seed 102). Learned with batch 2 and 8 calibration samples "
          f"({', '.join(f'{100 * b:.0f}%: {t} s' for b, t in learn_s.items())}). Not timed.", ""]
    md += harness.table(["schedule", "FLOPs removed", "PSNR, 10 digits", "PSNR, 40 digits", "SSIM, 40 digits"],
                        [[r["schedule"], f"{100 * r['flops_removed']:.1f}%", f"{r['psnr_10']:.2f}",
                          f"{r['psnr_40']:.2f}", f"{r['ssim_40']:.4f}"] for r in rows])
    harness.write_result(a.out, f"flux_warmup_{a.steps}", res, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
