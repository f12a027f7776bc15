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
from torch.utils.flop_counter import FlopCounterMode

import l2c_kernels as l2c
from l2c_kernels import metrics, models
from l2c_kernels.adapters.mmdit_branches import branch_names
from l2c_kernels.models import flux_digits
from l2c_kernels.models.text_encoder import caption_for
from l2c_kernels.runtime.block_flops import _CUSTOM, measure_block_flops
from l2c_kernels.runtime.branch_wrappers import measure_branch_flops

#: the streams each unit of a double block writes (0: text, 1: image); a single block's units write stream 0
STREAMS = {"attn1": (0, 1), "ff": (1,), "ff_context": (0,)}


# ---------------------------------------------------------------------------------------------- greedy schedules
def _single(blk) -> bool:
    return type(blk).__name__ == "FluxSingleTransformerBlock"


def record(bundle, labels, steps, seed):
    """Per step, from hooks: each unit's raw output ``(b, unit, stream)``, the adaLN gate that scales it
    ``(b, "gate", unit, stream)`` and each block's residual ``(b, "res", stream)``."""
    tr = bundle.transformer
    blocks = list(tr.transformer_blocks) + list(tr.single_transformer_blocks)
    steps_rec, cur, handles = [], {}, []

    def put(key, val):
        cur[key] = val.detach().clone()

    def hook(module, keys: dict):
        """Record ``module``'s output under ``keys`` (key -> index into the outputs, None: the output itself)."""
        def record_output(m, a, o):
            for key, i in keys.items():
                put(key, o if i is None else o[i])
        handles.append(module.register_forward_hook(record_output))

    for b, blk in enumerate(blocks):
        if _single(blk):
            hook(blk.norm, {(b, "gate", "attn1", 0): 1, (b, "gate", "ff", 0): 1})

            def split(m, a, o, b=b, blk=blk):  # proj_out of cat(attention, MLP): its two column blocks apart
                dim, w = blk.proj_out.out_features, blk.proj_out.weight
                put((b, "attn1", 0), F.linear(a[0][..., :dim], w[:, :dim]))
                put((b, "ff", 0), F.linear(a[0][..., dim:], w[:, dim:], blk.proj_out.bias))
            handles.append(blk.proj_out.register_forward_hook(split))
        else:
            hook(blk.norm1, {(b, "gate", "attn1", 1): 1, (b, "gate", "ff", 1): 4})
            hook(blk.norm1_context, {(b, "gate", "attn1", 0): 1, (b, "gate", "ff_context", 0): 4})
            hook(blk.attn, {(b, "attn1", 1): 0, (b, "attn1", 0): 1})
            hook(blk.ff, {(b, "ff", 1): None})
            hook(blk.ff_context, {(b, "ff_context", 0): None})

        def residual(m, a, kw, o, b=b):
            put((b, "res", 0), o[0] - kw["encoder_hidden_states"])
            put((b, "res", 1), o[1] - kw["hidden_states"])
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
    return blocks, branch_names(tr), steps_rec


def reuse_errors(blocks, names, rec):
    """``unit[s][b][i]`` and ``block[s][b]``: the L2 norm of what reusing at step ``s`` changes (the gated unit
    outputs, the block's residuals); inf at step 0, 0 for a single block's missing ff_context."""
    def sq(s, key, gate=None):
        d = rec[s][key] - rec[s - 1][key]
        return float(((d if gate is None else gate[:, None] * d) ** 2).sum())
    unit, block, inf = [], [], float("inf")
    for s in range(len(rec)):
        urow = []
        for b, blk in enumerate(blocks):
            streams = {n: (0,) if _single(blk) else STREAMS[n] for n in names}
            urow.append([0.0 if _single(blk) and n == "ff_context" else inf if s == 0 else
                         sum(sq(s, (b, n, k), rec[s][(b, "gate", n, k)]) for k in streams[n]) ** 0.5 for n in names])
        unit.append(urow)
        block.append([inf if s == 0 else sum(sq(s, (b, "res", k)) for k in (0, 1)) ** 0.5 for b in range(len(blocks))])
    return unit, block


def greedy(errors, costs, budget):
    """Reuse (step, unit) pairs by increasing error per FLOP until ``budget`` of the FLOPs is removed."""
    total = len(errors) * sum(costs)
    cand = sorted(((e / max(c, 1e-30), s, u) for s, row in enumerate(errors) for u, (e, c) in enumerate(zip(row, costs))
                   if c > 0 and e != float("inf")))
    compute, removed = [[True] * len(costs) for _ in errors], 0.0
    for _, s, u in cand:
        if removed >= budget * total:
            break
        compute[s][u] = False
        removed += costs[u]
    return compute


def greedy_comparison(args) -> tuple[str, dict, str]:
    bundle = models.load("flux-digits")
    tr, cfg = bundle.transformer, bundle.recommended_cfg
    labels, seed = list(range(10)), 0
    ts = flux_digits.timesteps_for(bundle, args.steps)
    full = models.sample(bundle, labels=labels, steps=args.steps, seed=seed, progress=False)
    # one call's inputs, for counting FLOPs per unit / block (CFG batch of 2 x 10)
    cond = flux_digits.conditions(bundle, [caption_for(v, i) for i, v in enumerate(labels)], cfg)
    x = torch.zeros(2 * len(labels), (bundle.image_size) ** 2 // 4, tr.config.in_channels)
    call = dict(hidden_states=x, timestep=torch.full((2 * len(labels),), 1.0), **cond)
    ubf, bf = measure_branch_flops(tr, **call), measure_block_flops(tr, **call)
    blocks, names, rec = record(bundle, labels, args.steps, seed)
    assert len(rec) == args.steps, len(rec)
    uerr, berr = reuse_errors(blocks, names, rec)
    nbr = len(names)

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
        mask = [[m[s][b * nbr:(b + 1) * nbr] for b in range(len(blocks))] for s in range(args.steps)]
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
                  cfg=cfg, labels=labels, seed=seed, sampler="FlowMatchEulerDiscreteScheduler (models.sample)",
                  unit_branch_flops=ubf, block_flops=bf, rows=rows)
    md = [f"# Branch level vs block level at equal FLOPs, flux-digits, {args.steps} Euler steps, CFG {cfg}, digits "
          f"0-9, seed {seed}",
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
        lr = meta["learner"]
        m = dict(meta, load_average_start=meta.get("load_average_start", meta.get("loadavg_start")),
                 load_average_end=meta.get("load_average_end", meta.get("loadavg_end")))  # runs from before the harness
        lines += [f"{harness.describe(m)}, {meta['dtype']} (shared machine). Both levels learned by "
                  f"`l2c.learn_schedule` with the same settings: {lr['steps']} steps, {lr['iterations']} iterations, "
                  f"batch {lr['batch_size']}, {lr['calibration_samples']} calibration samples, forecast "
                  f"`{lr['forecast']}`, seed {lr['seed']}. Budgets are fractions of FLOPs counted per unit / per block "
                  "on a real call; `generation` is counted again with FlopCounterMode over the evaluation run. PSNR: "
                  "mean (min) over the held-out images against full compute from the same noise.", ""]
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
    ap = harness.parser(__doc__, threads=None, out=None)
    ap.add_argument("--schedules", default="greedy", choices=["greedy", "learned"])
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.3, 0.5])
    ap.add_argument("--steps", type=int, default=None, help="default 16 (greedy), 12 (learned)")
    ap.add_argument("--threads", type=int, default=None, help="default 2 (greedy), 1 (learned)")
    ap.add_argument("--out", default=None, help="greedy: the results folder; learned: the files' path without suffix")
    ap.add_argument("--models", nargs="+", default=["tiny-flux"], choices=sorted(MODELS), help="learned only")
    for flag, kw in (("--iterations", dict(type=int, default=24)), ("--batch-size", dict(type=int, default=2)),
                     ("--calibration-samples", dict(type=int, default=4)),
                     ("--forecast", dict(default="none", choices=["none", "linear", "quadratic", "auto"])),
                     ("--seed", dict(type=int, default=0))):
        ap.add_argument(flag, help="learned only", **kw)
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
