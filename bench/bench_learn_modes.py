"""Step-wise against whole-trajectory router training on dit-digits: calibration error of the schedule each
picks, PSNR of held-out samples against full compute, and wall time.

    nice -n 10 python bench/bench_learn_modes.py --steps 20 --budget 0.5 --iterations 20
    # writes bench/results/learn_modes_<steps>.{json,md}
"""
from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import l2c_kernels as l2c
from l2c_kernels import metrics, models

RESULTS = Path(__file__).resolve().parent / "results"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--samples", type=int, default=20, help="held-out samples for PSNR")
    ap.add_argument("--modes", nargs="+", default=["trajectory", "stepwise"])
    a = ap.parse_args()
    torch.set_num_threads(2)
    bundle = models.load("dit-digits")
    labels = [i % 10 for i in range(a.samples)]
    full = models.sample(bundle, labels=labels, steps=a.steps, cfg=a.cfg, seed=123, progress=False)
    rows = []
    for mode in a.modes:
        t0 = time.time()
        s = l2c.learn_schedule(bundle, a.steps, a.budget, cfg=a.cfg, iterations=a.iterations, progress=False,
                               training=mode)
        sec = time.time() - t0
        fast = l2c.compile_schedule(bundle.transformer, s)
        imgs = models.sample(bundle, labels=labels, steps=a.steps, cfg=a.cfg, seed=123, progress=False,
                               transformer=fast)
        rows.append(dict(mode=mode, seconds=round(sec, 1), calibration_error_db=s.params["calibration_error_db"],
                         heldout_psnr_db=round(float(metrics.psnr(imgs, full)), 2), forecast=s.forecast,
                         flops_removed=round(s.flops_removed_fraction(), 4)))
        print(rows[-1], flush=True)
    res = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), device="cpu (2 cores, shared, loaded)",
               torch=torch.__version__, dtype="float32", model="dit-digits", steps=a.steps, sampler="ddim",
               cfg=a.cfg, budget=a.budget, iterations=a.iterations, heldout_samples=a.samples, rows=rows)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"learn_modes_{a.steps}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    md = [f"# Router training modes, dit-digits DDIM {a.steps}, budget {a.budget} ({res['date']})", "",
          f"{res['device']}, torch {res['torch']}, float32, CFG {a.cfg}, {a.iterations} iterations of batch 4; "
          f"held-out PSNR on {a.samples} samples (seed 123) against full compute. Wall times are on a machine "
          "shared with other jobs.", "",
          "| training | calibration error (dB, lower is better) | held-out PSNR (dB) | forecast | FLOPs removed | "
          "seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['mode']} | {r['calibration_error_db']:.2f} | {r['heldout_psnr_db']:.2f} | {r['forecast']} | "
                  f"{r['flops_removed']:.3f} | {r['seconds']:.0f} |")
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
