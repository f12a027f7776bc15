"""Learned branch-level vs learned block-level schedules at equal FLOPs on Flux.1-structured models.

For each model and budget the same learner (``l2c.learn_schedule``, the same seed, iterations, batch, calibration
and forecast) learns two schedules: block level (``branches=["block"]``: each block computed or its residual
reused) and branch level (``branches=branch_names(model)``: joint attention, ``ff`` and ``ff_context`` of the
double blocks, the attention and MLP halves of the single blocks). Both budgets are fractions of FLOPs counted per
unit (per block) with FlopCounterMode on a real call at the real token counts, so "equal FLOPs" means equal counted
FLOPs; the FLOPs every generation really ran are counted again on the evaluation run.

Evaluation: held-out prompts / digits and noise (another seed than training), PSNR of each generation against full
compute from the same noise, mean over images.

- ``tiny-flux``: the tiny ``FluxPipeline`` of ``tests/tiny_pipelines.py`` (Flux.1-dev layout: guidance embedding,
  packed latents, RoPE; random weights), 2 double + 4 single blocks, 64 x 128 px (32 image tokens), evaluated on
  the final latents of the unchanged pipeline (PSNR with the reference latents' range as the peak);
- ``flux-digits``: the bundled trained model (2 double + 6 single blocks), CFG 7, evaluated on its images
  (range [-1, 1]) through ``sampling.sample``.

    nice -n 10 python bench/bench_learned_branch_vs_block.py [--models tiny-flux flux-digits] [--budgets 0.3 0.5]
    # writes bench/results/learned_branch_vs_block.{json,md}
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
sys.path.insert(0, str(ROOT))

import l2c_kernels as l2c  # noqa: E402
from l2c_kernels.adapters.mmdit_branches import branch_names  # noqa: E402
from l2c_kernels.runtime.block_flops import _CUSTOM  # noqa: E402

TRAIN_PROMPTS = ["a red fox in the snow", "the city at night", "a bowl of fruit on a table", "waves at sunset"]
EVAL_PROMPTS = ["a lighthouse on a cliff", "an old car in the rain", "a cat asleep on a sofa",
                "mountains under stars", "a market full of people", "a small boat on a lake"]


def counted_calls(module):
    """Hooks that count, with FlopCounterMode, the FLOPs of every call of ``module``; returns (totals, remove)."""
    totals, stack = [0.0], []

    def pre(m, a, kw):
        fc = torch.utils.flop_counter.FlopCounterMode(display=False, custom_mapping=_CUSTOM)
        fc.__enter__()
        stack.append(fc)

    def post(m, a, kw, out):
        fc = stack.pop()
        fc.__exit__(None, None, None)
        totals[0] += float(fc.get_total_flops())

    h1 = module.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = module.register_forward_hook(post, with_kwargs=True)
    return totals, lambda: (h1.remove(), h2.remove())


def psnr_per_image(x, ref, peak) -> list:
    mse = (x.double() - ref.double()).pow(2).flatten(1).mean(1)
    return [float(10 * torch.log10(peak ** 2 / m)) if m > 0 else float("inf") for m in mse]


# ---------------------------------------------------------------------------------------------------------- models
class TinyFlux:
    name = "tiny-flux"

    def __init__(self, steps):
        from tests.tiny_pipelines import CALL_KW, tiny_flux_pipeline

        self.pipe = tiny_flux_pipeline(seed=0, layers=2, single_layers=4)
        self.pipe.set_progress_bar_config(disable=True)
        self.model = self.pipe.transformer
        self.kw = dict(CALL_KW["flux"])
        self.steps = steps
        self.describe = (f"tiny FluxPipeline (tests/tiny_pipelines.py, random weights), 2 double + 4 single blocks, "
                         f"{self.kw['height']}x{self.kw['width']} px, guidance embedding {self.kw['guidance_scale']}, "
                         f"{steps} Euler steps; trained on {len(TRAIN_PROMPTS)} prompts, evaluated on "
                         f"{len(EVAL_PROMPTS)} others (seed 1000)")

    def learn(self, budget, branches, args):
        return l2c.learn_schedule(self.pipe, num_inference_steps=self.steps, budget=budget, prompts=TRAIN_PROMPTS,
                                  height=self.kw["height"], width=self.kw["width"],
                                  guidance_scale=self.kw["guidance_scale"],
                                  max_sequence_length=self.kw["max_sequence_length"], branches=branches,
                                  iterations=args.iterations, batch_size=args.batch_size, seed=args.seed,
                                  calibration_samples=args.calibration_samples, forecast=args.forecast,
                                  progress=False)

    def generate(self, transformer):
        model = self.pipe.transformer
        self.pipe.transformer = transformer
        try:
            out = self.pipe(prompt=EVAL_PROMPTS, num_inference_steps=self.steps,
                            generator=torch.Generator().manual_seed(1000), output_type="latent", **self.kw)
        finally:
            self.pipe.transformer = model
        return out.images.float()

    def peak(self, ref):
        return float(ref.max() - ref.min())


class FluxDigits:
    name = "flux-digits"

    def __init__(self, steps):
        from l2c_kernels import models

        self.bundle = models.load("flux-digits")
        self.model = self.bundle.transformer
        self.steps = steps
        self.labels = [d for d in range(10) for _ in range(2)]
        self.describe = (f"bundled flux-digits (trained; 2 double + 6 single blocks), {steps} Euler steps, CFG "
                         f"{self.bundle.recommended_cfg}; evaluated on 20 digits (2 per class, seed 1000)")

    def learn(self, budget, branches, args):
        return l2c.learn_schedule(self.bundle, num_inference_steps=self.steps, budget=budget, branches=branches,
                                  iterations=args.iterations, batch_size=args.batch_size, seed=args.seed,
                                  calibration_samples=args.calibration_samples, forecast=args.forecast,
                                  progress=False)

    def generate(self, transformer):

        from l2c_kernels import models

        return models.sample(self.bundle, labels=self.labels, steps=self.steps, seed=1000, transformer=transformer,
                               progress=False)

    def peak(self, ref):
        return 2.0


MODELS = {"tiny-flux": TinyFlux, "flux-digits": FluxDigits}


def evaluate(m, sched, ref, full_flops):
    fast = l2c.compile_schedule(m.model, sched)
    totals, remove = counted_calls(fast)
    try:
        with torch.no_grad():
            out = m.generate(fast)
    finally:
        remove()
    per = psnr_per_image(out, ref, m.peak(ref))
    s = sched.summary()
    return dict(level="block" if sched.branches == ["block"] else "branch",
                flops_removed_schedule=round(sched.flops_removed_fraction(), 4),
                flops_removed_generation=round(1.0 - totals[0] / full_flops, 4),
                psnr_db=round(sum(per) / len(per), 2), psnr_min_db=round(min(per), 2),
                psnr_per_image=[round(v, 3) for v in per],
                removed_per_branch=s["removed_per_branch"], forecast=sched.forecast,
                calibration_error_db=sched.params.get("calibration_error_db"),
                train_seconds=sched.params.get("train_seconds"), plan=sched.plan)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny-flux"], choices=sorted(MODELS))
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.3, 0.5])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--iterations", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--calibration-samples", type=int, default=4)
    ap.add_argument("--forecast", default="none", choices=["none", "linear", "quadratic", "auto"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "learned_branch_vs_block"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, described = [], {}
    load_start = os.getloadavg()
    t_start = time.time()
    for name in args.models:
        m = MODELS[name](args.steps)
        described[name] = m.describe
        totals, remove = counted_calls(m.model)
        try:
            with torch.no_grad():
                ref = m.generate(m.model)
        finally:
            remove()
        full_flops = totals[0]
        for budget in args.budgets:
            for branches in (["block"], branch_names(m.model)):
                t0 = time.time()
                sched = m.learn(budget, branches, args)
                row = dict(model=name, budget=budget, **evaluate(m, sched, ref, full_flops),
                           learn_wall_s=round(time.time() - t0, 1))
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("plan", "psnr_per_image")}), flush=True)
    meta = dict(date=str(date.today()), device=platform.processor() or platform.machine(), torch=torch.__version__,
                dtype="float32", threads=args.threads, loadavg_start=load_start, loadavg_end=os.getloadavg(),
                wall_s=round(time.time() - t_start, 1), models=described,
                learner=dict(steps=args.steps, iterations=args.iterations, batch_size=args.batch_size,
                             calibration_samples=args.calibration_samples, forecast=args.forecast, seed=args.seed))
    runs, rows = merged(Path(args.out + ".json"), meta, rows, args.models)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(dict(runs=runs, rows=rows), indent=1))
    Path(args.out + ".md").write_text(report(runs, rows))
    print(report(runs, rows))


def merged(path: Path, meta: dict, rows: list, models: list) -> tuple:
    """This run's results with those of other models already in ``path`` (one model per run keeps a long
    comparison resumable): (runs, rows)."""
    runs, old = [], []
    if path.exists():
        d = json.loads(path.read_text())
        runs = [r for r in d.get("runs", [d["meta"]] if "meta" in d else []) if not set(r["models"]) & set(models)]
        old = [r for r in d.get("rows", []) if r["model"] not in models]
    return runs + [meta], old + rows


def report(runs, rows) -> str:
    lines = ["# Learned branch level vs learned block level at equal FLOPs", ""]
    for meta in runs:
        lines += _run_header(meta)
    lines += ["| model | budget | level | FLOPs removed (schedule) | FLOPs removed (generation) "
              "| PSNR dB mean (min) | removed per branch | learn s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["removed_per_branch"].items())
        lines.append(f"| {r['model']} | {100 * r['budget']:.0f}% | {r['level']} "
                     f"| {100 * r['flops_removed_schedule']:.1f}% | {100 * r['flops_removed_generation']:.1f}% "
                     f"| {r['psnr_db']} ({r['psnr_min_db']}) | {per} | {r['learn_wall_s']} |")
    lines.append("")
    for name in dict.fromkeys(r["model"] for r in rows):
        for b in sorted({r["budget"] for r in rows if r["model"] == name}):
            pair = {r["level"]: r for r in rows if r["model"] == name and r["budget"] == b}
            if len(pair) == 2:
                d = pair["branch"]["psnr_db"] - pair["block"]["psnr_db"]
                lines.append(f"- {name} at {100 * b:.0f}%: branch level {'+' if d >= 0 else ''}{d:.2f} dB against "
                             f"block level")
    return "\n".join(lines) + "\n"


def _run_header(meta) -> list:
    lr = meta["learner"]
    lines = [f"CPU ({meta['device']}), torch {meta['torch']}, {meta['dtype']}, {meta['threads']} thread(s), "
             f"{meta['date']}; load average {meta['loadavg_start'][0]:.1f} at the start, "
             f"{meta['loadavg_end'][0]:.1f} at the end (shared machine). Both levels learned by `l2c.learn_schedule` "
             f"with the same settings: {lr['steps']} steps, {lr['iterations']} iterations, batch {lr['batch_size']}, "
             f"{lr['calibration_samples']} calibration samples, forecast `{lr['forecast']}`, seed {lr['seed']}. "
             f"Budgets are fractions of FLOPs counted per unit / per block on a real call; `generation` is counted "
             f"again with FlopCounterMode over the evaluation run. PSNR: mean (min) over the held-out images against "
             f"full compute from the same noise.", ""]
    for name, d in meta["models"].items():
        lines.append(f"- **{name}**: {d}")
    return lines + [""]


if __name__ == "__main__":
    main()
