"""Branch level vs block level at equal FLOPs on Flux.1-structured models, PSNR against full compute.

``--schedules greedy`` (default; writes ``branch_vs_block_flux-digits.{json,md}``): on the bundled flux-digits, both
levels get their schedule by the same calibrated greedy rule: one full-compute generation records each unit's (or
block's) reuse error at every step, and units are reused in increasing order of error per FLOP saved until the
budget is removed. ``--schedules learned`` (``learned_branch_vs_block.{json,md}``; ``--out`` is the files' path
without suffix): the same ``l2c.learn_schedule`` settings learn both levels, on the tiny ``FluxPipeline`` of
``tests/tiny_pipelines.py`` (``tiny-flux``) and / or flux-digits, evaluated on held-out prompts / digits and noise.
Budgets are fractions of FLOPs counted per unit / block on a real call; each generation's FLOPs are counted again.
Notes: bench/NOTES.md ("SD3 / Flux at branch level", "Learned branch level vs learned block level").

    nice -n 10 python bench/bench_branch_vs_block.py
    nice -n 10 python bench/bench_branch_vs_block.py --schedules learned --models tiny-flux flux-digits
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import harness
import torch
import torch.nn.functional as F

import l2c_kernels as l2c
from l2c_kernels import metrics, models
from l2c_kernels.adapters.mmdit_branches import branch_names
from l2c_kernels.models import flux_digits
from l2c_kernels.models.text_encoder import caption_for
from l2c_kernels.runtime.block_flops import _CUSTOM, measure_block_flops
from l2c_kernels.runtime.branch_wrappers import measure_branch_flops


# ---------------------------------------------------------------------------------------------- greedy schedules
def record(bundle, labels, steps, seed):
    """Per step: each unit's gated contribution and raw output, and each block's residual, from hooks."""
    tr = bundle.transformer
    blocks = list(tr.transformer_blocks) + list(tr.single_transformer_blocks)
    names = branch_names(tr)
    steps_rec: list[dict] = []
    cur: dict = {}
    handles = []

    def put(key, val, *more):
        """Record ``val`` under ``key`` (and further key, value pairs); returns None (the hook changes nothing)."""
        cur[key] = val.detach().clone()
        if more:
            put(*more)

    for b, blk in enumerate(blocks):
        if type(blk).__name__ == "FluxSingleTransformerBlock":
            handles.append(blk.norm.register_forward_hook(lambda m, a, kw, o, b=b: put((b, "gate"), o[1]),
                                                          with_kwargs=True))

            def split(m, a, o, b=b, blk=blk):
                dim = blk.proj_out.out_features
                w = blk.proj_out.weight
                put((b, "attn1", 0), F.linear(a[0][..., :dim], w[:, :dim]))
                put((b, "ff", 0), F.linear(a[0][..., dim:], w[:, dim:], blk.proj_out.bias))
            handles.append(blk.proj_out.register_forward_hook(split))
        else:
            handles.append(blk.norm1.register_forward_hook(
                lambda m, a, kw, o, b=b: put((b, "g_attn"), o[1], (b, "g_ff"), o[4]), with_kwargs=True))
            handles.append(blk.norm1_context.register_forward_hook(
                lambda m, a, kw, o, b=b: put((b, "c_attn"), o[1], (b, "c_ff"), o[4]), with_kwargs=True))
            handles.append(blk.attn.register_forward_hook(
                lambda m, a, kw, o, b=b: put((b, "attn1", 1), o[0], (b, "attn1", 0), o[1]), with_kwargs=True))
            handles.append(blk.ff.register_forward_hook(lambda m, a, o, b=b: put((b, "ff", 1), o)))
            handles.append(blk.ff_context.register_forward_hook(lambda m, a, o, b=b: put((b, "ff_context", 0), o)))

        def residual(m, a, kw, o, b=b):
            put((b, "res", 0), o[0] - kw["encoder_hidden_states"], (b, "res", 1), o[1] - kw["hidden_states"])
        handles.append(blk.register_forward_hook(residual, with_kwargs=True))

    def on_call(m, a, kw):
        if cur:
            steps_rec.append(dict(cur))
            cur.clear()
    handles.append(tr.register_forward_pre_hook(on_call, with_kwargs=True))
    try:
        models.sample(bundle, labels=labels, steps=steps, seed=seed, progress=False)
    finally:
        for h in handles:
            h.remove()
    steps_rec.append(dict(cur))
    return blocks, names, steps_rec


def gate_of(rec, b, unit, stream, single):
    if single:
        return rec[(b, "gate")]
    return {("attn1", 1): rec[(b, "g_attn")], ("attn1", 0): rec[(b, "c_attn")], ("ff", 1): rec[(b, "g_ff")],
            ("ff_context", 0): rec[(b, "c_ff")]}[(unit, stream)]


def reuse_errors(blocks, names, rec):
    """``unit[s][b][i]`` and ``block[s][b]``: the L2 norm of what reusing at step ``s`` changes."""
    unit, block = [], []
    for s in range(len(rec)):
        urow, brow = [], []
        for b, blk in enumerate(blocks):
            single = type(blk).__name__ == "FluxSingleTransformerBlock"
            errs = []
            for unit_name in names:
                streams = [0] if single else {"attn1": [0, 1], "ff": [1], "ff_context": [0]}[unit_name]
                if single and unit_name == "ff_context":
                    errs.append(0.0)
                    continue
                if s == 0:
                    errs.append(float("inf"))
                    continue
                e2 = 0.0
                for k in streams:
                    g = gate_of(rec[s], b, unit_name, k, single)[:, None]
                    e2 += float(((g * (rec[s][(b, unit_name, k)] - rec[s - 1][(b, unit_name, k)])) ** 2).sum())
                errs.append(e2 ** 0.5)
            urow.append(errs)
            brow.append(float("inf") if s == 0 else sum(
                float(((rec[s][(b, "res", k)] - rec[s - 1][(b, "res", k)]) ** 2).sum()) for k in (0, 1)) ** 0.5)
        unit.append(urow)
        block.append(brow)
    return unit, block


def greedy(errors, costs, budget):
    """Reuse (step, unit) pairs by increasing error per FLOP until ``budget`` of the FLOPs is removed."""
    steps = len(errors)
    total = steps * sum(costs)
    cand = sorted(((e / max(c, 1e-30), s, u) for s, row in enumerate(errors) for u, (e, c) in enumerate(zip(row, costs))
                   if c > 0 and e != float("inf")))
    compute = [[True] * len(costs) for _ in range(steps)]
    removed = 0.0
    for _, s, u in cand:
        if removed >= budget * total:
            break
        compute[s][u] = False
        removed += costs[u]
    return compute


def greedy_comparison(args) -> tuple[str, dict, str]:
    bundle = models.load("flux-digits")
    tr = bundle.transformer
    labels, seed = list(range(10)), 0
    ts = flux_digits.timesteps_for(bundle, args.steps)
    full = models.sample(bundle, labels=labels, steps=args.steps, seed=seed, progress=False)
    # one call's inputs, for counting FLOPs per unit / block (CFG batch of 2 x 10)
    cond = flux_digits.conditions(bundle, [caption_for(v, i) for i, v in enumerate(labels)], bundle.recommended_cfg)
    x = torch.zeros(2 * len(labels), (bundle.image_size) ** 2 // 4, tr.config.in_channels)
    call = dict(hidden_states=x, timestep=torch.full((2 * len(labels),), 1.0), **cond)
    ubf, bf = measure_branch_flops(tr, **call), measure_block_flops(tr, **call)
    blocks, names, rec = record(bundle, labels, args.steps, seed)
    assert len(rec) == args.steps, len(rec)
    uerr, berr = reuse_errors(blocks, names, rec)
    nb, nbr = len(blocks), len(names)

    def generation(fn):
        if hasattr(fn, "reset"):
            fn.reset()
        out = []
        fl = harness.flops(lambda: out.append(models.sample(bundle, labels=labels, steps=args.steps, seed=seed,
                                                            transformer=fn, progress=False)))
        return fl, out[0]
    full_flops, _ = generation(tr)
    rows = []
    for budget in args.budgets:
        m = greedy([[e for row in srow for e in row] for srow in uerr], [c for row in ubf for c in row], budget)
        mask = [[m[s][b * nbr:(b + 1) * nbr] for b in range(nb)] for s in range(args.steps)]
        s_branch = l2c.Schedule.from_mask(tr, ts, mask, branches=names, unit_branch_flops=ubf, method="greedy")
        s_block = l2c.Schedule.from_mask(tr, ts, greedy(berr, bf, budget), branches=["block"], unit_flops=bf,
                                         method="greedy")
        for level, sched in (("branch", s_branch), ("block", s_block)):
            fl, imgs = generation(l2c.compile_schedule(tr, sched))
            rows.append(dict(budget=budget, level=level,
                             flops_removed_schedule=round(sched.flops_removed_fraction(), 4),
                             generation_flops_removed=round(1 - fl / full_flops, 4),
                             psnr_db=round(metrics.psnr(imgs, full), 2),
                             removed_per_branch=sched.summary()["removed_per_branch"]))
            harness.log(rows[-1])
    result = dict(benchmark="branch level vs block level at equal FLOPs, calibrated greedy schedules", dtype="fp32",
                  model="flux-digits (FluxTransformer2DModel, 2 double + 6 single blocks, trained)", steps=args.steps,
                  cfg=bundle.recommended_cfg, labels=labels, seed=seed,
                  sampler="FlowMatchEulerDiscreteScheduler (models.sample)", unit_branch_flops=ubf, block_flops=bf,
                  rows=rows)
    md = [f"# Branch level vs block level at equal FLOPs, flux-digits, {args.steps} Euler steps, CFG "
          f"{bundle.recommended_cfg}, digits 0-9, seed {seed}",
          f"{harness.describe(harness.meta())}, fp32. Both schedules by the same calibrated greedy rule (this script's "
          "docstring); PSNR of the 10 images against full compute from the same noise; `generation FLOPs removed` "
          "counted with FlopCounterMode over the whole generation.", ""]
    md += harness.table(["budget", "level", "FLOPs removed (schedule)", "generation FLOPs removed", "PSNR (dB)",
                         "removed per branch"], [_cells(r, "flops_removed_schedule", "generation_flops_removed")
                                                 + [r["psnr_db"], _per_branch(r)] for r in rows])
    return "branch_vs_block_flux-digits", result, "\n".join(md)


def _cells(r, sched_key, gen_key) -> list:
    return [f"{100 * r['budget']:.0f}%", r["level"], f"{100 * r[sched_key]:.1f}%", f"{100 * r[gen_key]:.1f}%"]


def _per_branch(r) -> str:
    return ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["removed_per_branch"].items())


# ---------------------------------------------------------------------------------------------- learned schedules
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


def learned_comparison(args) -> tuple[dict, str]:
    rows, described = [], {}
    for name in args.models:
        m = MODELS[name](args.steps)
        described[name] = m.describe
        totals, remove = counted_calls(m.model)
        try:
            with torch.no_grad():
                ref = m.generate(m.model)
        finally:
            remove()
        for budget in args.budgets:
            for branches in (["block"], branch_names(m.model)):
                t0 = time.time()
                sched = m.learn(budget, branches, args)
                rows.append(dict(model=name, budget=budget, **evaluate(m, sched, ref, totals[0]),
                                 learn_wall_s=round(time.time() - t0, 1)))
                harness.log(json.dumps({k: v for k, v in rows[-1].items() if k not in ("plan", "psnr_per_image")}))
    meta = harness.meta(dtype="float32", models=described, learner=dict(
        steps=args.steps, iterations=args.iterations, batch_size=args.batch_size,
        calibration_samples=args.calibration_samples, forecast=args.forecast, seed=args.seed))
    runs, rows = merged(Path(args.out + ".json"), meta, rows, args.models)
    return dict(runs=runs, rows=rows), report(runs, rows)


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


def _run_header(meta) -> list:
    lr = meta["learner"]
    m = dict(meta, load_average_start=meta.get("load_average_start", meta.get("loadavg_start")),
             load_average_end=meta.get("load_average_end", meta.get("loadavg_end")))  # runs recorded before the harness
    lines = [f"{harness.describe(m)}, {meta['dtype']} (shared machine). Both levels learned by `l2c.learn_schedule` "
             f"with the same settings: {lr['steps']} steps, {lr['iterations']} iterations, batch {lr['batch_size']}, "
             f"{lr['calibration_samples']} calibration samples, forecast `{lr['forecast']}`, seed {lr['seed']}. "
             f"Budgets are fractions of FLOPs counted per unit / per block on a real call; `generation` is counted "
             f"again with FlopCounterMode over the evaluation run. PSNR: mean (min) over the held-out images against "
             f"full compute from the same noise.", ""]
    return lines + [f"- **{name}**: {d}" for name, d in meta["models"].items()] + [""]


def main(argv=None):
    ap = harness.parser(__doc__, threads=None, out=None)
    ap.add_argument("--schedules", default="greedy", choices=["greedy", "learned"])
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.3, 0.5])
    ap.add_argument("--steps", type=int, default=None, help="default 16 (greedy), 12 (learned)")
    ap.add_argument("--threads", type=int, default=None, help="default 2 (greedy), 1 (learned)")
    ap.add_argument("--out", default=None, help="greedy: the results folder; learned: the files' path without suffix")
    ap.add_argument("--models", nargs="+", default=["tiny-flux"], choices=sorted(MODELS), help="learned only")
    ap.add_argument("--iterations", type=int, default=24, help="learned only")
    ap.add_argument("--batch-size", type=int, default=2, help="learned only")
    ap.add_argument("--calibration-samples", type=int, default=4, help="learned only")
    ap.add_argument("--forecast", default="none", choices=["none", "linear", "quadratic", "auto"], help="learned only")
    ap.add_argument("--seed", type=int, default=0, help="learned only")
    args = harness.parse(ap, argv)
    learned = args.schedules == "learned"
    args.steps = args.steps or (12 if learned else 16)
    torch.set_num_threads(args.threads or (1 if learned else 2))
    if learned:
        args.out = args.out or str(harness.RESULTS / "learned_branch_vs_block")
        res, md = learned_comparison(args)
        harness.write_result(Path(args.out).parent, Path(args.out).name, res, md)
    else:
        name, res, md = greedy_comparison(args)
        harness.write_result(args.out or harness.RESULTS, name, res, md)
    print(md)


if __name__ == "__main__":
    main()
