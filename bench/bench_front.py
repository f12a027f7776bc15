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

writes ``bench/results/front_<model>_<steps>.{json,md}``; the learned and searched schedules go where
``bench_pareto.py`` reads them (``bench/results/pareto_<model>_<steps>_schedules/``), so the timed comparison
measures the same schedules without learning them again.
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
sys.path.insert(0, str(ROOT / "bench"))

import l2c_kernels as l2c  # noqa: E402
from l2c_kernels import metrics, models, schedules  # noqa: E402
from l2c_kernels.learn.conditioning import denoiser_for  # noqa: E402

import bench_pareto  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="flux-digits", choices=list(models.MODEL_NAMES))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.35, 0.5, 0.67, 0.75])
    ap.add_argument("--samples", type=int, default=40, help="held-out digits scored (labels stratified, own noise)")
    ap.add_argument("--seed", type=int, default=777, help="seed of the held-out labels and noise")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--relearn", action="store_true",
                    help="learn the front again even if bench/results/pareto_<model>_<steps>_schedules holds it")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    bundle = models.load(a.model)
    model = bundle.transformer
    tag = bench_pareto.result_tag(a.model, a.steps)
    t0 = time.time()
    methods = bench_pareto.learned_schedules(bundle, a.steps, a.budgets, bench_pareto.guidance_scale(bundle, None),
                                             Path(a.out) / f"{tag}_schedules", a.relearn,
                                             bench_pareto.default_sampler(bundle), log=print)
    learn_s = time.time() - t0
    front = [sc for fam, _, sc in methods if fam == bench_pareto.LEARNED]
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

    for fam, label, sc in methods:
        if fam == bench_pareto.LEARNED:
            score(fam, label, sc)
    for warm in (1, 3):
        for k in (2, 3, 4, 5, 6):
            for fc in ("linear", "taylor"):
                score("fixed interval", f"first {warm}, every {k}, {fc}",
                      schedules.warm_up_interval(model, ts, warm, k, forecast=fc))
    for fam, label, sc in methods:
        if fam != bench_pareto.LEARNED:
            score(fam, label, sc)
    phases = [next((h["phase_seconds"] for h in sc.params.get("history", []) if "phase_seconds" in h), None)
              for sc in front]
    info = dict(model=a.model, steps=a.steps, budgets=a.budgets, samples=a.samples, seed=a.seed,
                learned_now=learn_s > 1.0, front_seconds=front[0].params.get("front_seconds"),
                phase_seconds=phases, threads=a.threads, torch=torch.__version__,
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
             f"full compute. Learning the front of {len(a.budgets)} budgets in one call: {info['front_seconds']} s "
             f"(seconds per phase and budget: {phases}; the first budget's step search includes measuring the segment "
             f"costs). Searchers use the learner's own segment costs.", "",
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
