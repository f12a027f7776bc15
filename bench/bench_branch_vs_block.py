"""Learned branch level vs learned block level at equal FLOPs on Flux.1-structured models, PSNR against full compute.

The same ``l2c.learn_schedule`` settings learn both levels, on the tiny ``FluxPipeline`` of
``tests/tiny_pipelines.py`` (``tiny-flux``) and / or flux-digits, evaluated on held-out prompts / digits and noise.
Budgets are fractions of FLOPs counted per unit / block on a real call; each generation's FLOPs are counted again.
Notes: bench/NOTES.md ("Learned branch level vs learned block level").

    nice -n 10 python bench/bench_branch_vs_block.py --models tiny-flux flux-digits

writes ``learned_branch_vs_block.{json,md}`` (``--out``: the files' path without suffix); a run of one model keeps
the other model's rows of an earlier run.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import harness
import torch
from torch.utils.flop_counter import FlopCounterMode

import l2c_kernels as l2c
from l2c_kernels import models
from l2c_kernels.adapters.mmdit_branches import branch_names
from l2c_kernels.runtime.block_flops import _CUSTOM


def _cells(r, sched_key, gen_key) -> list:
    return [f"{100 * r['budget']:.0f}%", r["level"], f"{100 * r[sched_key]:.1f}%", f"{100 * r[gen_key]:.1f}%"]


def _per_branch(r) -> str:
    return ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["removed_per_branch"].items())


# ---------------------------------------------------------------------------------------------- learned schedules
TRAIN_PROMPTS = ["a red fox in the snow", "the city at night", "a bowl of fruit on a table", "waves at sunset"]
EVAL_PROMPTS = ["a lighthouse on a cliff", "an old car in the rain", "a cat asleep on a sofa",
                "mountains under stars", "a market full of people", "a small boat on a lake"]
LEARNER = ("iterations", "batch_size", "calibration_samples", "forecast", "seed")  #: the settings both levels share


def counted_generation(m, transformer) -> tuple:
    """``m.generate(transformer)`` and the FLOPs of its calls of ``transformer``, each call counted by its own
    FlopCounterMode from hooks (the pipeline's work around the model left out)."""
    total, stack = [0.0], []

    def pre(mod, a):
        stack.append(FlopCounterMode(display=False, custom_mapping=_CUSTOM))
        stack[-1].__enter__()

    def post(mod, a, out):
        fc = stack.pop()
        fc.__exit__(None, None, None)
        total[0] += float(fc.get_total_flops())
    handles = [transformer.register_forward_pre_hook(pre), transformer.register_forward_hook(post)]
    try:
        with torch.no_grad():
            return m.generate(transformer), total[0]
    finally:
        for h in handles:
            h.remove()


class TinyFlux:
    def __init__(self, steps):
        from tests.tiny_pipelines import CALL_KW, tiny_flux_pipeline

        self.pipe = tiny_flux_pipeline(seed=0, layers=2, single_layers=4)
        self.pipe.set_progress_bar_config(disable=True)
        self.model, self.kw, self.steps = self.pipe.transformer, dict(CALL_KW["flux"]), steps
        self.describe = (f"tiny FluxPipeline (tests/tiny_pipelines.py, random weights), 2 double + 4 single blocks, "
                         f"{self.kw['height']}x{self.kw['width']} px, guidance embedding {self.kw['guidance_scale']}, "
                         f"{steps} Euler steps; trained on {len(TRAIN_PROMPTS)} prompts, evaluated on "
                         f"{len(EVAL_PROMPTS)} others (seed 1000)")

    def learn(self, budget, branches, args):
        size = {k: self.kw[k] for k in ("height", "width", "guidance_scale", "max_sequence_length")}
        return l2c.learn_schedule(self.pipe, num_inference_steps=self.steps, budget=budget, prompts=TRAIN_PROMPTS,
                                  branches=branches, progress=False, **size, **{k: getattr(args, k) for k in LEARNER})

    def generate(self, transformer):
        model, self.pipe.transformer = self.pipe.transformer, transformer
        try:
            return self.pipe(prompt=EVAL_PROMPTS, num_inference_steps=self.steps, output_type="latent",
                             generator=torch.Generator().manual_seed(1000), **self.kw).images.float()
        finally:
            self.pipe.transformer = model

    def peak(self, ref):
        return float(ref.max() - ref.min())


class FluxDigits:
    def __init__(self, steps):
        self.bundle = models.load("flux-digits")
        self.model, self.steps, self.labels = self.bundle.transformer, steps, [d for d in range(10) for _ in range(2)]
        self.describe = (f"bundled flux-digits (trained; 2 double + 6 single blocks), {steps} Euler steps, CFG "
                         f"{self.bundle.recommended_cfg}; evaluated on 20 digits (2 per class, seed 1000)")

    def learn(self, budget, branches, args):
        return l2c.learn_schedule(self.bundle, num_inference_steps=self.steps, budget=budget, branches=branches,
                                  progress=False, **{k: getattr(args, k) for k in LEARNER})

    def generate(self, transformer):
        return models.sample(self.bundle, labels=self.labels, steps=self.steps, seed=1000, transformer=transformer,
                             progress=False)

    def peak(self, ref):
        return 2.0


MODELS = {"tiny-flux": TinyFlux, "flux-digits": FluxDigits}


def evaluate(m, sched, ref, full_flops):
    out, flops = counted_generation(m, l2c.compile_schedule(m.model, sched))
    mse, peak = (out.double() - ref.double()).pow(2).flatten(1).mean(1), m.peak(ref)
    per = [float(10 * torch.log10(peak ** 2 / e)) if e > 0 else float("inf") for e in mse]  # PSNR per image
    return dict(level="block" if sched.branches == ["block"] else "branch",
                flops_removed_schedule=round(sched.flops_removed_fraction(), 4),
                flops_removed_generation=round(1.0 - flops / full_flops, 4),
                psnr_db=round(sum(per) / len(per), 2), psnr_min_db=round(min(per), 2),
                psnr_per_image=[round(v, 3) for v in per],
                removed_per_branch=sched.summary()["removed_per_branch"], forecast=sched.forecast,
                calibration_error_db=sched.params.get("calibration_error_db"),
                train_seconds=sched.params.get("train_seconds"), plan=sched.plan)


def learned_comparison(args) -> tuple[dict, str]:
    rows, described = [], {}
    for name in args.models:
        m = MODELS[name](args.steps)
        described[name] = m.describe
        ref, full_flops = counted_generation(m, m.model)
        for budget in args.budgets:
            for branches in (["block"], branch_names(m.model)):
                t0 = time.time()
                sched = m.learn(budget, branches, args)
                rows.append(dict(model=name, budget=budget, **evaluate(m, sched, ref, full_flops),
                                 learn_wall_s=round(time.time() - t0, 1)))
                harness.log(json.dumps({k: v for k, v in rows[-1].items() if k not in ("plan", "psnr_per_image")}))
    meta = harness.meta(dtype="float32", models=described,
                        learner=dict(steps=args.steps, **{k: getattr(args, k) for k in LEARNER}))
    return dict(meta=meta, rows=rows), report(meta, rows)


def report(meta, rows) -> str:
    lr = meta["learner"]
    lines = ["# Learned branch level vs learned block level at equal FLOPs", "",
             f"{harness.describe(meta)}, {meta['dtype']}. Both levels learned by `l2c.learn_schedule` with the same "
             f"settings: {lr['steps']} steps, {lr['iterations']} iterations, batch {lr['batch_size']}, "
             f"{lr['calibration_samples']} calibration samples, forecast `{lr['forecast']}`, seed {lr['seed']}. "
             "Budgets: fractions of FLOPs counted per unit / per block on a real call (`generation`: recounted over "
             "the evaluation run). PSNR: mean (min) over held-out images against full compute, same noise.", ""]
    lines += [f"- **{name}**: {d}" for name, d in meta["models"].items()] + [""]
    lines += harness.table(["model", "budget", "level", "FLOPs removed (schedule)", "FLOPs removed (generation)",
                            "PSNR dB mean (min)", "removed per branch", "learn s"],
                           [[r["model"], *_cells(r, "flops_removed_schedule", "flops_removed_generation"),
                             f"{r['psnr_db']} ({r['psnr_min_db']})", _per_branch(r), r["learn_wall_s"]] for r in rows])
    lines.append("")
    for name in dict.fromkeys(r["model"] for r in rows):
        for b in sorted({r["budget"] for r in rows if r["model"] == name}):
            pair = {r["level"]: r for r in rows if r["model"] == name and r["budget"] == b}
            if len(pair) == 2:
                d = pair["branch"]["psnr_db"] - pair["block"]["psnr_db"]
                lines.append(f"- {name} at {100 * b:.0f}%: branch level {d:+.2f} dB against block level")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = harness.parser(__doc__, threads=1, out=None)
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.3, 0.5])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default=None, help="the files' path without suffix (default: "
                                                "bench/results/learned_branch_vs_block)")
    ap.add_argument("--models", nargs="+", default=["tiny-flux"], choices=sorted(MODELS))
    for flag, kw in (("--iterations", dict(type=int, default=24)), ("--batch-size", dict(type=int, default=2)),
                     ("--calibration-samples", dict(type=int, default=4)),
                     ("--forecast", dict(default="none", choices=["none", "linear", "quadratic", "auto"])),
                     ("--seed", dict(type=int, default=0))):
        ap.add_argument(flag, help="learner setting, both levels", **kw)
    args = harness.parse(ap, argv)
    args.out = args.out or str(harness.RESULTS / "learned_branch_vs_block")
    res, md = learned_comparison(args)
    harness.write_result(Path(args.out).parent, Path(args.out).name, res, md)
    print(md)


if __name__ == "__main__":
    main()
