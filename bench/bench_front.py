"""A learned front (several budgets in one call) against fixed-interval and searched step schedules, on samples
the learner never saw.

For a bundled model and a step count, ``learn_schedule(..., budgets=[...])`` learns every budget in one call (timed);
then, on ``--samples`` digits with their own labels and noise (seed ``--seed``, never used in learning), every
schedule samples against full compute from the same noise:

- the learned schedules;
- fixed intervals in this package's runtime: the first ``w`` steps computed, then every ``k``-th (``w`` = 1 or 3,
  ``k`` = 2..6), with the linear and the Taylor forecast (TaylorSeer's structure, static);
- the static searchers re-implemented on the learner's own segment costs (``learn.step_search.searcher_steps``):
  DPCache-style (path-aware DP), CEM-style (path-unaware DP), LeMiCa-style (minimax path), with their forecasts.

Reported per schedule: work removed (the fraction of block/branch FLOPs the schedule skips), mean PSNR and the worst
sample's PSNR against full compute. Speed is not timed here (``bench_pareto.py`` times schedules; at step level the
speedup follows the work removed, see its tables).

    python bench/bench_front.py --model flux-digits --steps 50
    python bench/bench_front.py --model dit-digits --steps 50 --budgets 0.35 0.5 0.67 0.75

writes ``bench/results/front_<model>_<steps>.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

import l2c_kernels as l2c  # noqa: E402
from l2c_kernels import metrics, models, schedules  # noqa: E402
from l2c_kernels.learn import step_search  # noqa: E402
from l2c_kernels.learn.conditioning import denoiser_for  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="flux-digits", choices=list(models.MODEL_NAMES))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.35, 0.5, 0.67, 0.75])
    ap.add_argument("--samples", type=int, default=40, help="held-out digits scored (labels stratified, own noise)")
    ap.add_argument("--seed", type=int, default=777, help="seed of the held-out labels and noise")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    bundle = models.load(a.model)
    model = bundle.transformer
    shared: dict = {}
    t0 = time.time()
    front = l2c.learn_front(bundle, a.steps, a.budgets, shared=shared, progress=True)
    learn_s = time.time() - t0
    costs = next(v for k, v in shared.items() if isinstance(k, tuple) and k[0] == "segment_costs")
    den = denoiser_for(bundle, a.samples, None, None, seed=a.seed)
    ts = den.timesteps(a.steps)
    noise = den.noise(a.seed)
    ref, _ = den.sample_with(model, a.steps, noise)
    rows = []

    def score(family, label, sched):
        x, _ = den.sample_with(l2c.compile_schedule(model, sched), a.steps, noise)
        per = metrics.psnr_per_image(x, ref)
        rows.append(dict(family=family, setting=label, removed=round(sched.flops_removed_fraction(), 4),
                         psnr=round(metrics.psnr(x, ref), 2), worst=round(float(per.min()), 2),
                         forecast=sched.forecast))
        r = rows[-1]
        print(f"{family:28s} {label:48s} removed {r['removed']:.3f}  PSNR {r['psnr']:6.2f}  worst {r['worst']:6.2f}",
              flush=True)

    for s in front:
        p = s.params
        label = f"budget {p['budget']:.2f}, {s.forecast}" + (f" (from {p['front_from_budget']:.2f})"
                                                             if "front_from_budget" in p else "")
        score("learned (L2C)", label, s)
    for warm in (1, 3):
        for k in (2, 3, 4, 5, 6):
            for fc in ("linear", "taylor"):
                score("fixed interval", f"first {warm}, every {k}, {fc}",
                      schedules.warm_up_interval(model, ts, warm, k, forecast=fc))
    for b in a.budgets:
        for name, (fc, _, _) in step_search.SEARCHERS.items():
            st = step_search.searcher_steps(costs, b, name)
            score(f"{name}-style search", f"budget {b:.2f}, {fc}", schedules.computed_steps(model, ts, st, fc))
    info = dict(model=a.model, steps=a.steps, budgets=a.budgets, samples=a.samples, seed=a.seed,
                learn_seconds=round(learn_s, 1), learn_seconds_per_budget=round(learn_s / len(a.budgets), 1),
                segment_cost_runs=costs.runs, segment_cost_seconds=round(costs.seconds, 1),
                max_interval=costs.max_interval, threads=a.threads, torch=torch.__version__,
                machine=f"{platform.machine()} CPU", date=str(date.today()),
                load=round(os.getloadavg()[0], 2), command="python bench/" + " ".join([Path(__file__).name] + (
                    argv if argv is not None else sys.argv[1:])), rows=rows,
                learned_steps=[[i for i, row in enumerate(s.compute_mask()) if any(map(any, row))] for s in front])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"front_{a.model}_{a.steps}"
    stem.with_suffix(".json").write_text(json.dumps(info, indent=1))
    lines = [f"# Learned front vs fixed intervals and static searchers: {a.model}, {a.steps} steps", "",
             f"{info['machine']}, {a.threads} threads, torch {info['torch']}, {info['date']}, load {info['load']}. "
             f"Quality on {a.samples} held-out digits (seed {a.seed}: labels and noise the learner never saw) against "
             f"full compute. Learning the front of {len(a.budgets)} budgets: {info['learn_seconds']} s "
             f"({info['learn_seconds_per_budget']} s per budget; segment costs {info['segment_cost_seconds']} s, "
             f"{costs.runs} runs). Searchers use the learner's own segment costs.", "",
             f"Regenerate: `{info['command']}`", "",
             "| family | setting | work removed | mean PSNR (dB) | worst sample (dB) |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["removed"], -r["psnr"])):
        lines.append(f"| {r['family']} | {r['setting']} | {100 * r['removed']:.0f}% | {r['psnr']:.2f} | "
                     f"{r['worst']:.2f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
