"""The ``l2c`` command: learn, inspect and measure static cache schedules.

    l2c demo                      learn a schedule for the bundled DiT, compile it, compare with full compute
    l2c learn --model dit-digits --steps 20 --budget 0.4 -o dit.l2c.json
    l2c show dit.l2c.json         summary and a heatmap PNG
    l2c bench dit.l2c.json        measured speedup and PSNR of a schedule on its bundled model
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _model_for_schedule(sched, name):
    from .models import load

    bundle = load(name)
    sched.validate_for(bundle.transformer)
    return bundle


def _threads(n):
    import torch

    if n:
        torch.set_num_threads(n)


def cmd_demo(a) -> int:
    import torch

    from . import compile_schedule
    from .evaluate import compare, default_labels, strip_images
    from .learn import learn_schedule
    from .models import load
    from .plots import schedule_heatmap, side_by_side

    _threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    bundle = load(a.model)
    cfg = a.cfg if a.cfg is not None else bundle.recommended_cfg
    print(f"[1/3] learning a schedule for {a.model}: {a.steps} {a.scheduler} steps, CFG {cfg}, "
          f"budget {100 * a.budget:.0f}% of branch FLOPs", flush=True)
    sched = learn_schedule(bundle, num_inference_steps=a.steps, budget=a.budget, scheduler=a.scheduler, cfg=cfg,
                           iterations=a.iterations, batch_size=4, seed=a.seed, forecast=a.forecast)
    sched.save(out / "schedule.l2c.json")
    schedule_heatmap(sched, out / "schedule_heatmap.png")
    print(sched.format_summary(), flush=True)
    print(f"[2/3] sampling {a.samples} digits with and without the schedule (same noise), {a.repeats} timed runs",
          flush=True)
    fast = compile_schedule(bundle.transformer, sched)
    labels = default_labels(a.samples)
    res = compare(bundle, {"full": bundle.transformer, "cached": fast}, labels, a.steps, a.scheduler, cfg, a.seed,
                  repeats=a.repeats)
    c = res["cached"]
    side_by_side({"full compute": res["full"]["images"],
                  f"learned schedule: {c['speedup']:.2f}x, PSNR {c['psnr']:.1f} dB": c["images"]},
                 out / "side_by_side.png")
    report = dict(model=a.model, steps=a.steps, scheduler=a.scheduler, cfg=cfg, budget=a.budget,
                  flops_removed=sched.flops_removed_fraction(), branches_removed=sched.removed_fraction(),
                  results=strip_images(res), torch=torch.__version__, threads=torch.get_num_threads(),
                  total_seconds=round(time.time() - t0, 1))
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"[3/3] results ({a.samples} images, median of {a.repeats} runs, {torch.get_num_threads()} threads):")
    print(f"  full compute:    {res['full']['seconds']:.2f} s")
    print(f"  learned schedule: {c['seconds']:.2f} s  -> speedup {c['speedup']:.2f}x")
    print(f"  branch FLOPs removed: {100 * sched.flops_removed_fraction():.1f}%   "
          f"PSNR {c['psnr']:.1f} dB   SSIM {c['ssim']:.3f} (against full compute, same noise)")
    print(f"  wrote {out / 'side_by_side.png'}, {out / 'schedule_heatmap.png'}, {out / 'schedule.l2c.json'}, "
          f"{out / 'report.json'}  ({time.time() - t0:.0f} s in all)")
    return 0


def cmd_learn(a) -> int:
    from .learn import learn_schedule
    from .models import load
    from .plots import schedule_heatmap

    _threads(a.threads)
    bundle = load(a.model)
    cfg = a.cfg if a.cfg is not None else bundle.recommended_cfg
    sched = learn_schedule(bundle, num_inference_steps=a.steps, budget=a.budget, scheduler=a.scheduler, cfg=cfg,
                           iterations=a.iterations, batch_size=a.batch, seed=a.seed, forecast=a.forecast)
    sched.params["model"] = a.model
    sched.save(a.output)
    print(sched.format_summary())
    png = Path(a.output).with_suffix(".png")
    schedule_heatmap(sched, png)
    print(f"wrote {a.output} and {png}")
    return 0


def cmd_show(a) -> int:
    from .plots import schedule_heatmap
    from .schedule import Schedule

    sched = Schedule.load(a.schedule)
    print(sched.format_summary())
    png = Path(a.png) if a.png else Path(a.schedule).with_suffix(".png")
    schedule_heatmap(sched, png)
    print(f"heatmap: {png}")
    return 0


def cmd_bench(a) -> int:
    from . import compile_schedule
    from .evaluate import compare, default_labels, strip_images
    from .schedule import Schedule

    _threads(a.threads)
    sched = Schedule.load(a.schedule)
    name = a.model or sched.params.get("model") or ("pixart-digits" if "attn2" in sched.branches else "dit-digits")
    bundle = _model_for_schedule(sched, name)
    steps = len(sched.timesteps)
    scheduler = a.scheduler or sched.params.get("scheduler", "ddim")
    cfg = a.cfg if a.cfg is not None else sched.params.get("cfg", bundle.recommended_cfg)
    fast = compile_schedule(bundle.transformer, sched)
    res = compare(bundle, {"full": bundle.transformer, "cached": fast}, default_labels(a.samples), steps, scheduler,
                  cfg, a.seed, repeats=a.repeats)
    r = strip_images(res)
    print(json.dumps(dict(model=name, steps=steps, scheduler=scheduler, cfg=cfg,
                          flops_removed=round(sched.flops_removed_fraction(), 4), **r), indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="l2c", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp, model=True, forecast=False):
        if model:
            sp.add_argument("--model", default="dit-digits", help="bundled model: dit-digits or pixart-digits")
        sp.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's recommended)")
        if forecast:
            sp.add_argument("--forecast", default="auto", choices=["auto", "none", "linear", "quadratic"],
                            help="what a reused branch contributes: its last output (none), the extrapolation from "
                                 "its last two or three outputs (linear, quadratic), or whichever measures best "
                                 "(auto, default)")

    d = sub.add_parser("demo", help="learn, compile and compare a schedule on the bundled DiT (a few minutes on CPU)",
                       description="Learn a schedule for a bundled model, compile it, sample with and without it "
                                   "from the same noise, and write a side-by-side PNG, a schedule heatmap, the "
                                   "schedule JSON and a report.")
    common(d, forecast=True)
    d.add_argument("--steps", type=int, default=20, help="sampling steps")
    d.add_argument("--scheduler", default="ddim", choices=["ddim", "dpm++", "euler"])
    d.add_argument("--budget", type=float, default=0.5, help="fraction of branch FLOPs to remove, in (0, 1)")
    d.add_argument("--iterations", type=int, default=30, help="router training iterations")
    d.add_argument("--samples", type=int, default=16, help="images to sample for the comparison")
    d.add_argument("--repeats", type=int, default=3, help="timed sampling runs (median reported)")
    d.add_argument("--out", default="l2c-demo", help="output folder")
    d.set_defaults(func=cmd_demo)

    lp = sub.add_parser("learn", help="learn a schedule for a bundled model and save it as JSON",
                        description="Train the L2C router along the sampler's trajectory and rank its scores to a "
                                    "FLOPs budget.")
    common(lp, forecast=True)
    lp.add_argument("--steps", type=int, default=20)
    lp.add_argument("--scheduler", default="ddim", choices=["ddim", "dpm++", "euler"])
    lp.add_argument("--budget", type=float, default=0.4, help="fraction of branch FLOPs to remove, in (0, 1)")
    lp.add_argument("--iterations", type=int, default=60)
    lp.add_argument("--batch", type=int, default=4, help="images per training trajectory")
    lp.add_argument("-o", "--output", default="schedule.l2c.json")
    lp.set_defaults(func=cmd_learn)

    sp = sub.add_parser("show", help="print a schedule's summary and draw its heatmap",
                        description="Summary (work removed per step and branch, FLOPs saved) and a heatmap PNG.")
    sp.add_argument("schedule")
    sp.add_argument("--png", default=None, help="heatmap path (default: next to the schedule)")
    sp.set_defaults(func=cmd_show)

    bp = sub.add_parser("bench", help="measure a schedule's speedup and PSNR on its bundled model",
                        description="Sample with full compute and with the schedule from the same noise; print "
                                    "median times, speedup, PSNR and SSIM as JSON.")
    bp.add_argument("schedule")
    common(bp, model=False)
    bp.add_argument("--model", default=None, help="bundled model (default: from the schedule)")
    bp.add_argument("--scheduler", default=None)
    bp.add_argument("--samples", type=int, default=16)
    bp.add_argument("--repeats", type=int, default=3)
    bp.set_defaults(func=cmd_bench)
    return p


def main(argv=None) -> int:
    from .models.registry import MODEL_NAMES
    from .schedule import ScheduleError

    args = build_parser().parse_args(argv)
    budget = getattr(args, "budget", None)
    if budget is not None and not 0.0 < budget < 1.0:
        print(f"l2c: error: --budget must be in (0, 1) (the fraction of branch FLOPs to remove), got {budget}",
              file=sys.stderr)
        return 2
    model = getattr(args, "model", None)
    if model is not None and model not in MODEL_NAMES:
        print(f"l2c: error: unknown model {model!r}; bundled models are {', '.join(MODEL_NAMES)}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ScheduleError, FileNotFoundError) as e:
        print(f"l2c: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
