"""Branch level vs block level at equal FLOPs on the bundled, trained flux-digits model (Flux.1 structure:
2 double + 6 single blocks), PSNR against full compute from the same noise.

Both levels get their schedule by the same calibrated greedy rule (a static, Block-Caching-like choice, not
the L2C router, which does not drive branch-level MMDiT schedules yet): one full-compute generation records,
at every step, what reusing each unit would add to its stream instead of what computing it adds --

- a unit (``attn1``, ``ff``, ``ff_context``, a single block's attention / MLP half): ``gate_s * (y_s - y_{s-1})``
  for its raw output ``y`` (the runtime reuses the raw output under the current step's gate);
- a block: ``(out - in)_s - (out - in)_{s-1}`` per stream --

and its L2 norm is the unit's reuse error at that step. Units (or blocks) are then reused in increasing order of
error per FLOP saved until the budget of unit (block) FLOPs is removed; step 0 computes everything. Each schedule
runs through ``compile_schedule``; the whole generation's FLOPs are counted with FlopCounterMode for both, so
"equal FLOPs" is checked on what really ran.

    nice -n 10 python bench/bench_branch_vs_block.py   # writes bench/results/branch_vs_block_flux-digits.{json,md}
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import l2c_kernels as l2c  # noqa: E402
from l2c_kernels import metrics, models  # noqa: E402
from l2c_kernels.adapters.mmdit_branches import branch_names  # noqa: E402
from l2c_kernels.models import flux_digits  # noqa: E402
from l2c_kernels.models.text_encoder import caption_for  # noqa: E402
from l2c_kernels.runtime.block_flops import _CUSTOM, measure_block_flops  # noqa: E402
from l2c_kernels.runtime.branch_wrappers import measure_branch_flops  # noqa: E402


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle = models.load("flux-digits")
    tr = bundle.transformer
    labels, seed = list(range(10)), 0
    ts = flux_digits.timesteps_for(bundle, args.steps)
    full = models.sample(bundle, labels=labels, steps=args.steps, seed=seed, progress=False)

    # one call's inputs, for counting FLOPs per unit / block (CFG batch of 2 x 10)
    cond = flux_digits.conditions(bundle, [caption_for(v, i) for i, v in enumerate(labels)], bundle.recommended_cfg)
    x = torch.zeros(2 * len(labels), (bundle.image_size) ** 2 // 4, tr.config.in_channels)
    call = dict(hidden_states=x, timestep=torch.full((2 * len(labels),), 1.0), **cond)
    ubf = measure_branch_flops(tr, **call)
    bf = measure_block_flops(tr, **call)
    blocks, names, rec = record(bundle, labels, args.steps, seed)
    assert len(rec) == args.steps, len(rec)
    uerr, berr = reuse_errors(blocks, names, rec)
    nb, nbr = len(blocks), len(names)

    def generation_flops(fn):
        if hasattr(fn, "reset"):
            fn.reset()
        with torch.no_grad(), torch.utils.flop_counter.FlopCounterMode(display=False, custom_mapping=_CUSTOM) as fc:
            imgs = models.sample(bundle, labels=labels, steps=args.steps, seed=seed, transformer=fn,
                                      progress=False)
        return fc.get_total_flops(), imgs

    full_flops, _ = generation_flops(tr)
    rows = []
    for budget in args.budgets:
        flat_costs = [c for row in ubf for c in row]
        m = greedy([[e for row in srow for e in row] for srow in uerr], flat_costs, budget)
        mask = [[m[s][b * nbr:(b + 1) * nbr] for b in range(nb)] for s in range(args.steps)]
        s_branch = l2c.Schedule.from_mask(tr, ts, mask, branches=names, unit_branch_flops=ubf, method="greedy")
        mb = greedy(berr, bf, budget)
        s_block = l2c.Schedule.from_mask(tr, ts, mb, branches=["block"], unit_flops=bf, method="greedy")
        for level, sched in (("branch", s_branch), ("block", s_block)):
            fl, imgs = generation_flops(l2c.compile_schedule(tr, sched))
            rows.append(dict(budget=budget, level=level, flops_removed_schedule=round(sched.flops_removed_fraction(), 4),
                             generation_flops_removed=round(1 - fl / full_flops, 4),
                             psnr_db=round(metrics.psnr(imgs, full), 2),
                             removed_per_branch=sched.summary()["removed_per_branch"]))
            print(rows[-1], flush=True)
    result = dict(benchmark="branch level vs block level at equal FLOPs, calibrated greedy schedules",
                  date=str(date.today()), device=f"CPU ({args.threads} threads)", torch=torch.__version__,
                  dtype="fp32", model="flux-digits (FluxTransformer2DModel, 2 double + 6 single blocks, trained)",
                  steps=args.steps, cfg=bundle.recommended_cfg, labels=labels, seed=seed,
                  sampler="FlowMatchEulerDiscreteScheduler (models.sample)", unit_branch_flops=ubf,
                  block_flops=bf, rows=rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "branch_vs_block_flux-digits.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [f"# Branch level vs block level at equal FLOPs, flux-digits, {args.steps} Euler steps, CFG "
          f"{bundle.recommended_cfg}, digits 0-9, seed {seed}",
          f"CPU, torch {torch.__version__}, fp32, {date.today()}. Both schedules by the same calibrated greedy rule "
          f"(`bench/bench_branch_vs_block.py` docstring); PSNR of the 10 images against full compute from the same noise; "
          f"`generation FLOPs removed` counted with FlopCounterMode over the whole generation.", "",
          "| budget | level | FLOPs removed (schedule) | generation FLOPs removed | PSNR (dB) | removed per branch |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        per = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["removed_per_branch"].items())
        md.append(f"| {100 * r['budget']:.0f}% | {r['level']} | {100 * r['flops_removed_schedule']:.1f}% | "
                  f"{100 * r['generation_flops_removed']:.1f}% | {r['psnr_db']} | {per} |")
    (out / "branch_vs_block_flux-digits.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
