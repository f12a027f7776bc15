"""Quality cost of running a schedule made for N steps at M steps (``l2c.enable(..., resample=True)``).

For a bundled model: the learned schedules made for DDIM ``--from`` steps, resampled over normalised time to
DDIM ``--to`` steps, against the schedule learned for ``--to`` steps at the same budget and FORA; PSNR of each
against full compute at ``--to`` steps from the same noise, and the branch FLOPs removed.

    nice -n 10 python bench/bench_resample.py --model dit-digits    # writes bench/results/resample_<model>.{json,md}
"""
from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

import torch

import l2c_kernels as l2c
from l2c_kernels import metrics, models, schedules
from l2c_kernels.runtime import resample_schedule

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dit-digits")
    p.add_argument("--from", dest="src", type=int, default=50)
    p.add_argument("--to", type=int, default=20)
    p.add_argument("--budgets", nargs="+", default=["35", "50"])
    p.add_argument("--samples", type=int, default=20)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    bundle = models.load(a.model)
    tr = bundle.transformer
    labels = [i % 10 for i in range(a.samples)]
    ts = models.timesteps_for(bundle, a.to, "ddim")

    def run(sched):
        fast = None if sched is None else l2c.compile_schedule(tr, sched, cuda_graphs=False)
        return models.sample(bundle, labels=labels, steps=a.to, seed=0, transformer=fast, progress=False)

    full = run(None)
    rows = []
    for b in a.budgets:
        src = l2c.Schedule.load(RESULTS / f"pareto_{a.model}_{a.src}_schedules" / f"learned_{b}.l2c.json")
        cands = [(f"learned for {a.src} steps ({b}%), resampled to {a.to}", resample_schedule(src, ts))]
        native = RESULTS / f"pareto_{a.model}_{a.to}_schedules" / f"learned_{b}.l2c.json"
        if native.exists():
            cands.append((f"learned for {a.to} steps ({b}%)", l2c.Schedule.load(native)))
        for label, s in cands:
            rows.append(dict(label=label, flops_removed=round(s.flops_removed_fraction(), 3),
                             forecast=s.forecast, psnr_db=round(float(metrics.psnr(run(s), full)), 2)))
            print(rows[-1], flush=True)
    s = schedules.uniform(tr, ts, 2)
    rows.append(dict(label=f"FORA every 2nd step ({a.to} steps)", flops_removed=round(s.flops_removed_fraction(), 3),
                     forecast="none", psnr_db=round(float(metrics.psnr(run(s), full)), 2)))
    print(rows[-1], flush=True)
    res = dict(model=a.model, from_steps=a.src, to_steps=a.to, samples=a.samples, torch=torch.__version__,
               date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), rows=rows)
    out = RESULTS / f"resample_{a.model}"
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    md = [f"# A schedule made for {a.src} steps run at {a.to} ({a.model}, DDIM, {a.samples} digits, {res['date']})", "",
          f"PSNR against full compute at {a.to} steps from the same noise (CPU, torch {torch.__version__}, fp32).", "",
          "| schedule | branch FLOPs removed | forecast | PSNR (dB) |", "|---|---|---|---|"]
    md += [f"| {r['label']} | {r['flops_removed']:.0%} | {r['forecast']} | {r['psnr_db']:.2f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
