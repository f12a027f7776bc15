"""A learned front (several budgets in one call) against fixed-interval and searched step schedules, on samples
the learner never saw.

The learned schedules, fixed intervals (the first ``w`` steps computed, then every ``k``-th, linear / Taylor
forecast) and the static searchers on the learner's own segment costs (DPCache-, CEM-, LeMiCa-style) sample
``--samples`` held-out digits against full compute; reported: work removed, mean and worst PSNR. Not timed
(``bench_pareto.py`` times schedules). Notes: bench/NOTES.md ("Global search over the step structure").

    python bench/bench_front.py --model flux-digits --steps 50
    python bench/bench_front.py --model dit-digits --steps 50 --budgets 0.35 0.5 0.67 0.75

writes ``front_<model>_<steps>.{json,md}`` and the learned and searched schedules to
``front_<model>_<steps>_schedules/`` (the timed tables of ``bench_pareto.py`` keep their own).

    python bench/bench_front.py --model dit-digits --steps 20 --resample-from 50

instead scores the quality cost of running a schedule made for N steps at ``--steps`` (``l2c.enable(...,
resample=True)``): the fronts learned for both step counts (``front_<model>_<N>_schedules/``, learned for
``--steps`` if missing), the first resampled, against FORA; writes ``resample_<model>.{json,md}``.
"""
from __future__ import annotations

import time
from pathlib import Path

import bench_pareto
import harness

import l2c_kernels as l2c
from l2c_kernels import metrics, models, schedules
from l2c_kernels.sampling.conditioning import denoiser_for
from l2c_kernels.runtime import resample_schedule


def main(argv=None) -> int:
    ap = harness.parser(__doc__)
    ap.add_argument("--model", default="flux-digits", choices=list(models.MODEL_NAMES))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.35, 0.5, 0.67, 0.75])
    ap.add_argument("--samples", type=int, default=40, help="held-out digits scored (labels stratified, own noise)")
    ap.add_argument("--seed", type=int, default=777, help="seed of the held-out labels and noise")
    ap.add_argument("--relearn", action="store_true",
                    help="learn the front again even if its schedules folder holds it")
    ap.add_argument("--resample-from", type=int, default=None, metavar="N",
                    help="score the front learned for N steps resampled to --steps (see above)")
    a = harness.parse(ap, argv)
    sources = resample_sources(a) if a.resample_from else None   # refused before any sampling when one is missing
    bundle = models.load(a.model)
    model = bundle.transformer
    t0 = time.time()
    methods = bench_pareto.learned_schedules(bundle, a.steps, a.budgets, bench_pareto.guidance_scale(bundle, None),
                                             Path(a.out) / f"front_{a.model}_{a.steps}_schedules", a.relearn,
                                             bench_pareto.default_sampler(bundle), log=print)
    learn_s = time.time() - t0
    front = [sc for fam, _, sc in methods if fam == bench_pareto.LEARNED]
    if a.resample_from:
        methods = [(f"learned for {a.steps} steps", f"{100 * b:.0f}%", sc) for b, sc in zip(a.budgets, front)]
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

    if a.resample_from:
        return resampled(a, bundle, ts, sources, methods, score, rows)
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
                phase_seconds=phases, rows=rows,
                learned_steps=[[i for i, row in enumerate(s.compute_mask()) if any(map(any, row))] for s in front])
    lines = [f"# Learned front vs fixed intervals and static searchers: {a.model}, {a.steps} steps", "",
             f"{harness.describe(harness.meta())}. Quality on {a.samples} held-out digits (seed {a.seed}: labels and "
             f"noise the learner never saw) against full compute. Learning the front of {len(a.budgets)} budgets in "
             f"one call: {info['front_seconds']} s (seconds per phase and budget: {phases}; the first budget's step "
             "search includes measuring the segment costs). Searchers use the learner's own segment costs.", ""]
    path = harness.write_result(a.out, f"front_{a.model}_{a.steps}", info, "\n".join(lines + rows_table(rows)))
    print(f"wrote {path} and its .md")
    return 0


def rows_table(rows) -> list:
    return harness.table(["family", "setting", "work removed", "mean PSNR (dB)", "worst sample (dB)"],
                         [[r["family"], r["setting"], f"{100 * r['removed']:.0f}%", f"{r['psnr']:.2f}",
                           f"{r['worst']:.2f}"] for r in sorted(rows, key=lambda r: (r["removed"], -r["psnr"]))])


def resample_sources(a) -> list:
    """The schedules of the front learned for ``--resample-from`` steps, one per budget."""
    folder = Path(a.out) / f"front_{a.model}_{a.resample_from}_schedules"
    paths = [folder / f"learned_{round(100 * b)}.l2c.json" for b in a.budgets]
    for path in paths:
        if not path.exists():
            raise SystemExit(f"{path} is missing: run bench/bench_front.py --model {a.model} --steps "
                             f"{a.resample_from} first")
    return [l2c.Schedule.load(p) for p in paths]


def resampled(a, bundle, ts, sources, native, score, rows) -> int:
    """Each budget's schedule learned for ``--resample-from`` steps (``sources``) resampled to ``ts``, beside the one
    learned for ``len(ts)`` steps at that budget, and FORA every 2nd step."""
    for src, (fam, label, sc) in zip(sources, native):
        score(f"learned for {a.resample_from} steps, resampled", label, resample_schedule(src, ts))
        score(fam, label, sc)
    score("uniform (FORA)", "every 2nd step", schedules.uniform(bundle.transformer, ts, 2))
    sampler = bench_pareto.SAMPLER_TITLES[bench_pareto.default_sampler(bundle)]
    lines = [f"# A schedule made for {a.resample_from} steps run at {a.steps} ({a.model}, {sampler})", "",
             f"{harness.describe(harness.meta())}, fp32. Quality on {a.samples} held-out digits (seed {a.seed}) "
             f"against full compute at {a.steps} steps from the same noise. Budgets are those the fronts were "
             "learned at; work removed is what the resampled schedule removes at the new step count.", ""]
    info = dict(model=a.model, from_steps=a.resample_from, to_steps=a.steps, samples=a.samples, seed=a.seed,
                rows=rows)
    path = harness.write_result(a.out, f"resample_{a.model}", info, "\n".join(lines + rows_table(rows)))
    print(f"wrote {path} and its .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
