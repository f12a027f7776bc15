"""Quality cost of running a schedule made for N steps at M steps (``l2c.enable(..., resample=True)``): the learned
schedules made for DDIM ``--from`` steps, resampled to ``--to`` steps, against the schedule learned for ``--to``
steps at the same budget and FORA; PSNR against full compute at ``--to`` steps from the same noise.

    python bench/bench_resample.py --model dit-digits    # writes resample_<model>.{json,md}

reads the schedules ``bench_front.py`` learned at both step counts (``front_<model>_<steps>_schedules/``).
"""
from __future__ import annotations

from pathlib import Path

import harness
import torch

import l2c_kernels as l2c
from l2c_kernels import metrics, models, schedules
from l2c_kernels.runtime import resample_schedule


def main(argv=None):
    p = harness.parser(__doc__, threads=1)
    p.add_argument("--model", default="dit-digits")
    p.add_argument("--from", dest="src", type=int, default=50)
    p.add_argument("--to", type=int, default=20)
    p.add_argument("--budgets", nargs="+", default=["35", "50"])
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--schedules", default=str(harness.RESULTS),
                   help="where the learned schedules are (<table>_<model>_<steps>_schedules/)")
    p.add_argument("--table", default="front", choices=["front", "pareto"],
                   help="whose learned schedules: bench_front.py's fronts (default) or bench_pareto.py's tables")
    a = harness.parse(p, argv)
    torch.set_num_threads(a.threads)
    bundle = models.load(a.model)
    tr = bundle.transformer
    labels = [i % 10 for i in range(a.samples)]
    ts = models.timesteps_for(bundle, a.to, "ddim")

    def run(sched):
        fast = None if sched is None else l2c.compile_schedule(tr, sched, cuda_graphs=False)
        return models.sample(bundle, labels=labels, steps=a.to, seed=0, transformer=fast, progress=False)

    def row(label, s):
        return dict(label=label, flops_removed=round(s.flops_removed_fraction(), 3), forecast=s.forecast,
                    psnr_db=round(float(metrics.psnr(run(s), full)), 2))
    full = run(None)
    rows = []
    for b in a.budgets:
        src = l2c.Schedule.load(Path(a.schedules) / f"{a.table}_{a.model}_{a.src}_schedules" / f"learned_{b}.l2c.json")
        cands = [(f"learned for {a.src} steps ({b}%), resampled to {a.to}", resample_schedule(src, ts))]
        native = Path(a.schedules) / f"{a.table}_{a.model}_{a.to}_schedules" / f"learned_{b}.l2c.json"
        if native.exists():
            cands.append((f"learned for {a.to} steps ({b}%)", l2c.Schedule.load(native)))
        for label, s in cands:
            rows.append(row(label, s))
            harness.log(rows[-1])
    rows.append(row(f"FORA every 2nd step ({a.to} steps)", schedules.uniform(tr, ts, 2)))
    res = dict(model=a.model, from_steps=a.src, to_steps=a.to, samples=a.samples, rows=rows)
    md = [f"# A schedule made for {a.src} steps run at {a.to} ({a.model}, DDIM, {a.samples} digits)", "",
          f"PSNR against full compute at {a.to} steps from the same noise ({harness.describe(harness.meta())}, fp32).",
          ""] + harness.table(["schedule", "branch FLOPs removed", "forecast", "PSNR (dB)"],
                              [[r["label"], f"{r['flops_removed']:.0%}", r["forecast"], f"{r['psnr_db']:.2f}"]
                               for r in rows])
    harness.write_result(a.out, f"resample_{a.model}", res, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
