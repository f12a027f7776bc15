"""Step-wise against whole-trajectory router training on dit-digits: calibration error of the schedule each
picks, PSNR of held-out samples against full compute, and wall time (bench/NOTES.md).

    nice -n 10 python bench/bench_learn_modes.py --steps 20 --budget 0.5 --iterations 20
    # writes learn_modes_<steps>.{json,md}
"""
from __future__ import annotations

import time

import harness
import torch

import l2c_kernels as l2c
from l2c_kernels import metrics, models


def main(argv=None):
    ap = harness.parser(__doc__)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--samples", type=int, default=20, help="held-out samples for PSNR")
    ap.add_argument("--modes", nargs="+", default=["trajectory", "stepwise"])
    a = harness.parse(ap, argv)
    torch.set_num_threads(a.threads)
    bundle = models.load("dit-digits")
    labels = [i % 10 for i in range(a.samples)]
    full = models.sample(bundle, labels=labels, steps=a.steps, cfg=a.cfg, seed=123, progress=False)
    rows = []
    for mode in a.modes:
        t0 = time.time()
        s = l2c.learn_schedule(bundle, a.steps, a.budget, cfg=a.cfg, iterations=a.iterations, progress=False,
                               training=mode)
        sec = time.time() - t0
        imgs = models.sample(bundle, labels=labels, steps=a.steps, cfg=a.cfg, seed=123, progress=False,
                             transformer=l2c.compile_schedule(bundle.transformer, s))
        rows.append(dict(mode=mode, seconds=round(sec, 1), calibration_error_db=s.params["calibration_error_db"],
                         heldout_psnr_db=round(float(metrics.psnr(imgs, full)), 2), forecast=s.forecast,
                         flops_removed=round(s.flops_removed_fraction(), 4)))
        harness.log(rows[-1])
    res = dict(dtype="float32", model="dit-digits", steps=a.steps, sampler="ddim", cfg=a.cfg, budget=a.budget,
               iterations=a.iterations, heldout_samples=a.samples, rows=rows)
    md = [f"# Router training modes, dit-digits DDIM {a.steps}, budget {a.budget}", "",
          f"{harness.describe(harness.meta())}, float32, CFG {a.cfg}, {a.iterations} iterations of batch 4; held-out "
          f"PSNR on {a.samples} samples (seed 123) against full compute. Wall times depend on the machine's other "
          "jobs.", ""]
    md += harness.table(["training", "calibration error (dB, lower is better)", "held-out PSNR (dB)", "forecast",
                         "FLOPs removed", "seconds"],
                        [[r["mode"], f"{r['calibration_error_db']:.2f}", f"{r['heldout_psnr_db']:.2f}", r["forecast"],
                          f"{r['flops_removed']:.3f}", f"{r['seconds']:.0f}"] for r in rows])
    harness.write_result(a.out, f"learn_modes_{a.steps}", res, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
