"""The ``l2c`` command: learn, inspect and measure static cache schedules.

    l2c demo                      learn a schedule for the bundled DiT, compile it, compare with full compute
    l2c demo --model flux-digits  the same on the bundled Flux (Euler flow matching, CFG 7)
    l2c learn --model dit-digits --steps 20 --budget 0.4 -o dit.l2c.json
    l2c learn --model flux-digits --steps 28 --budget 0.5 -o flux.l2c.json
    l2c learn --pipeline ./my-dit --labels 207 360 387 --steps 50 --budget 0.4 --device cuda --dtype bf16
    l2c learn --pipeline ./pixart-sigma --prompts prompts.txt --height 1024 --width 768 --guidance-scale 4.5
    l2c show dit.l2c.json         summary and a heatmap PNG
    l2c bench dit.l2c.json        measured speedup and PSNR of a schedule on its bundled model
    l2c bench dit.l2c.json --pipeline ./my-dit --labels 207 360      ... or on a diffusers pipeline

--pipeline takes a local folder written by a diffusers pipeline's save_pretrained(); it is loaded
offline (nothing is downloaded).

Bundled models: dit-digits and pixart-digits (DDPM; samplers ddim, dpm++, euler) and flux-digits
(rectified flow; Euler flow matching, "flow-euler", the only sampler that fits it). Learning defaults
per model are in LEARN_DEFAULTS: flux-digits learns with fewer, smaller iterations (its transformer
call costs several times a DiT's on CPU).
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


def _flux_digits_learning() -> dict:
    from .models.flux_digits import LEARN_DEFAULTS as d

    return dict(iterations=d["iterations"], batch=d["batch_size"], calibration_samples=d["calibration_samples"])


#: Learning settings per bundled model where they differ from the learner's: (iterations, batch, calibration samples).
LEARN_DEFAULTS = {"flux-digits": _flux_digits_learning()}
GENERIC_LEARN = dict(iterations=None, batch=None, calibration_samples=None)   # None: the learner's defaults


def _learn_setting(a, model: str | None, key: str):
    """The command line's value, else the model's learning default, else None (the learner's default)."""
    v = getattr(a, key, None)
    if v is not None:
        return v
    return LEARN_DEFAULTS.get(model or "", {}).get(key, GENERIC_LEARN[key])


def _bundled_scheduler(model: str, requested: str | None) -> str:
    """The sampler name for a bundled model: as asked, else flow-euler for flux-digits and ddim for the others."""
    if requested is not None:
        return requested
    from .models.registry import FLOW_MODELS

    return "flow-euler" if model in FLOW_MODELS else "ddim"


def _warm_up_arg(v: str):
    """``--warm-up``: ``auto`` or a number of steps."""
    if v == "auto":
        return v
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of steps, got {v!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of steps >= 0, got {n}")
    return n


def _learn_kwargs(a, model: str | None) -> dict:
    """``learn_schedule`` keywords for what the command line or the model's defaults set (the rest: the learner's)."""
    out = {} if getattr(a, "warm_up", None) is None else dict(warm_up=a.warm_up)
    if getattr(a, "speed_check", None) is not None:
        out["speed_check"] = a.speed_check
    for key, kw in (("iterations", "iterations"), ("batch", "batch_size"), ("calibration_samples", "calibration_samples")):
        v = _learn_setting(a, model, key)
        if v is not None:
            out[kw] = v
    return out


def _iterations(a, model: str | None) -> int:
    from .learn.router import DEFAULT_ITERATIONS

    v = _learn_setting(a, model, "iterations")
    return DEFAULT_ITERATIONS if v is None else v


DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
          "float16": "float16"}


def load_pipeline(path, device: str = "cpu", dtype: str = "fp32"):
    """A diffusers pipeline from a local ``save_pretrained`` folder, offline, on ``device`` in ``dtype``."""
    import torch
    from diffusers import DiffusionPipeline

    folder = Path(path)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{path}: not a diffusers pipeline folder (no model_index.json); write one with "
                                "pipe.save_pretrained(folder)")
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True,
                                             torch_dtype=getattr(torch, DTYPES[dtype]))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _conditions(a) -> dict:
    """labels / prompts / size / guidance from the command line (None where not given)."""
    prompts = None
    if a.prompts:
        text = Path(a.prompts).read_text().splitlines()
        prompts = [t.strip() for t in text if t.strip()]
        if not prompts:
            raise ValueError(f"{a.prompts}: no prompts (one per line)")
    g = a.guidance_scale if a.guidance_scale is not None else a.cfg
    kw = dict(labels=a.labels, prompts=prompts, height=a.height, width=a.width, guidance_scale=g)
    if a.true_cfg_scale is not None or a.negative_prompt is not None:  # FluxPipeline's true CFG
        kw.update(true_cfg_scale=a.true_cfg_scale, negative_prompt=a.negative_prompt)
    return kw


def cmd_demo(a) -> int:
    import torch

    from .runtime import compile_schedule
    from .models.evaluate import compare, default_labels, strip_images
    from .learn import learn_schedule
    from .models import load
    from .plots import schedule_heatmap, side_by_side

    _threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    bundle = load(a.model)
    cfg = a.cfg if a.cfg is not None else bundle.recommended_cfg
    scheduler = _bundled_scheduler(a.model, a.scheduler)
    iterations = _iterations(a, a.model)
    print(f"[1/3] learning a schedule for {a.model}: {a.steps} {scheduler} steps, CFG {cfg}, "
          f"budget {100 * a.budget:.0f}% of branch FLOPs, {iterations} iterations", flush=True)
    sched = learn_schedule(bundle, num_inference_steps=a.steps, budget=a.budget, scheduler=scheduler, cfg=cfg,
                           seed=a.seed, forecast=a.forecast, **_learn_kwargs(a, a.model))
    sched.save(out / "schedule.l2c.json")
    schedule_heatmap(sched, out / "schedule_heatmap.png")
    print(sched.format_summary(), flush=True)
    print(f"[2/3] sampling {a.samples} digits with and without the schedule (same noise), {a.repeats} timed runs",
          flush=True)
    fast = compile_schedule(bundle.transformer, sched)
    labels = default_labels(a.samples)
    res = compare(bundle, {"full": bundle.transformer, "cached": fast}, labels, a.steps, scheduler, cfg, a.seed,
                  repeats=a.repeats)
    c = res["cached"]
    side_by_side({"full compute": res["full"]["images"],
                  f"learned schedule: {c['speedup']:.2f}x, PSNR {c['psnr']:.1f} dB": c["images"]},
                 out / "side_by_side.png")
    report = dict(model=a.model, steps=a.steps, scheduler=scheduler, cfg=cfg, budget=a.budget,
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
    from .plots import schedule_heatmap

    _threads(a.threads)
    model = None
    if a.pipeline:
        target = load_pipeline(a.pipeline, a.device, a.dtype)
        kw = _conditions(a)
        scheduler = a.scheduler
    else:
        import torch

        from .models import load

        model = a.model or "dit-digits"
        if a.true_cfg_scale is not None or a.negative_prompt is not None:
            raise ValueError("--true-cfg-scale / --negative-prompt are FluxPipeline's true CFG (with --pipeline); "
                             f"{model} takes --guidance-scale")
        target = load(model, device=a.device, dtype=getattr(torch, DTYPES[a.dtype]))
        cfg = a.guidance_scale if a.guidance_scale is not None else a.cfg
        kw = dict(labels=a.labels, guidance_scale=cfg if cfg is not None else target.recommended_cfg)
        scheduler = _bundled_scheduler(model, a.scheduler)
    if a.speedup is not None and a.budget is not None:
        raise ValueError("give --budget or --speedup, not both")
    targets = dict(speedups=list(a.speedup)) if a.speedup is not None else dict(budgets=list(a.budget or [0.4]))
    front = learn_schedule(target, num_inference_steps=a.steps, scheduler=scheduler, seed=a.seed,
                           forecast=a.forecast, **targets, **_learn_kwargs(a, model), **kw)
    if len(front) == 1:
        outputs = [Path(a.output)]
    elif a.speedup is not None:
        outputs = [front_path(a.output, speedup=s.params["target_speedup"]) for s in front]
    else:
        outputs = [front_path(a.output, s.params["budget"]) for s in front]
    for sched, path in zip(front, outputs):
        if a.pipeline:
            sched.params["pipeline"] = str(a.pipeline)
        else:
            sched.params["model"] = a.model or "dit-digits"
        sched.save(path)
        print(sched.format_summary())
        png = path.with_suffix(".png")
        schedule_heatmap(sched, png)
        print(f"wrote {path} and {png}")
    return 0


def front_path(output, budget: float | None = None, speedup: float | None = None) -> Path:
    """Where ``l2c learn`` writes one budget of several: ``out.l2c.json`` -> ``out.b50.l2c.json`` (budget 0.5), or
    one speed target: ``out.2x.l2c.json`` (``--speedup 2``), ``out.1.5x.l2c.json``."""
    p = Path(output)
    name = p.name
    stem, ext = (name[:-len(".l2c.json")], ".l2c.json") if name.endswith(".l2c.json") else (p.stem, p.suffix)
    tag = f"{speedup:g}x" if speedup is not None else f"b{round(100 * budget):02d}"
    return p.with_name(f"{stem}.{tag}{ext}")


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
    from .runtime import compile_schedule
    from .schedule import Schedule

    _threads(a.threads)
    sched = Schedule.load(a.schedule)
    if a.pipeline:
        return _bench_pipeline(a, sched)
    from .models.evaluate import compare, default_labels, strip_images

    name = a.model or sched.params.get("model") or _bundled_name(sched)
    bundle = _model_for_schedule(sched, name)
    steps = len(sched.timesteps)
    scheduler = _bundled_scheduler(name, a.scheduler or sched.params.get("scheduler"))
    cfg = a.cfg if a.cfg is not None else sched.params.get("cfg", bundle.recommended_cfg)
    fast = compile_schedule(bundle.transformer, sched)
    res = compare(bundle, {"full": bundle.transformer, "cached": fast}, default_labels(a.samples), steps, scheduler,
                  cfg, a.seed, repeats=a.repeats)
    r = strip_images(res)
    print(json.dumps(dict(model=name, steps=steps, scheduler=scheduler, cfg=cfg,
                          flops_removed=round(sched.flops_removed_fraction(), 4), **r), indent=1))
    return 0


def _bundled_name(sched) -> str:
    """The bundled model a schedule without a ``model`` record was made for, from its model class and branches."""
    if sched.model_class == "FluxTransformer2DModel":
        return "flux-digits"
    return "pixart-digits" if "attn2" in sched.branches else "dit-digits"


def _bench_pipeline(a, sched) -> int:
    """Full compute and the schedule on the pipeline's transformer, same noise, through the library's loop:
    median seconds per generation, speedup, PSNR of the final latents (peak = the reference's range)."""
    from .learn import denoiser_for
    from .runtime import compile_schedule
    from .timing import device_clock, interleave, medians

    pipe = load_pipeline(a.pipeline, a.device, a.dtype)
    model = getattr(pipe.transformer, "original_model", pipe.transformer)
    sched.validate_for(model)
    kw = _conditions(a)
    if kw["guidance_scale"] is None:
        kw["guidance_scale"] = sched.params.get("guidance_scale")
    if "true_cfg_scale" not in kw and "true_cfg_scale" in sched.params:   # FluxPipeline's true CFG, as learned
        kw.update(true_cfg_scale=sched.params["true_cfg_scale"], negative_prompt=sched.params.get("negative_prompt"))
    true_cfg = {k: kw[k] for k in ("true_cfg_scale", "negative_prompt") if k in kw}
    steps = len(sched.timesteps)
    scheduler = a.scheduler or sched.params.get("scheduler")
    den = denoiser_for(pipe, a.samples, kw["guidance_scale"], scheduler, seed=a.seed, labels=kw["labels"],
                       prompts=kw["prompts"], height=kw["height"], width=kw["width"], **true_cfg)
    ts = den.timesteps(steps)
    from .schedule import same_timestep

    if not all(same_timestep(x, y) for x, y in zip(ts, sched.timesteps)):
        raise ValueError(f"the schedule was learned for timesteps {sched.timesteps}; this pipeline and size sample "
                         f"at {ts}: learn it with the same scheduler, steps and size")
    fast = compile_schedule(model, sched)
    noise = den.noise(a.seed)
    out = {}

    def runner(name, tr):
        def run():
            x, _ = den.sample_with(tr, steps, noise)
            out.setdefault(name, x.float())   # the warm-up round's samples
        return run

    med = medians(interleave({"full": runner("full", model), "cached": runner("cached", fast)}, a.repeats,
                             clock=device_clock(den.device)))
    ref = out["full"]
    mse = float((out["cached"] - ref).pow(2).mean())
    peak = float(ref.max() - ref.min())
    psnr = float("inf") if mse == 0 else 10 * __import__("math").log10(peak ** 2 / mse)
    print(json.dumps(dict(pipeline=str(a.pipeline), steps=steps, guidance_scale=den.cfg, samples=den.num_samples,
                          device=str(den.device), dtype=str(den.dtype).replace("torch.", ""),
                          flops_removed=round(sched.flops_removed_fraction(), 4),
                          full_seconds=round(med["full"], 4), cached_seconds=round(med["cached"], 4),
                          speedup=round(med["full"] / med["cached"], 3), psnr_latents_db=round(psnr, 2)), indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .sampling.schedulers import SCHEDULER_NAMES

    p = argparse.ArgumentParser(prog="l2c", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp, model=True, forecast=False):
        if model:
            sp.add_argument("--model", default="dit-digits",
                            help="bundled model: dit-digits, pixart-digits or flux-digits")
        sp.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's recommended)")
        if forecast:
            sp.add_argument("--forecast", default="auto", choices=["auto", "none", "linear", "quadratic", "taylor"],
                            help="what a reused branch contributes: its last output (none), the extrapolation from "
                                 "its last two or three outputs (linear, quadratic), TaylorSeer's second-order "
                                 "expansion from its last three (taylor), or whichever measures best (auto, default)")
            sp.add_argument("--warm-up", type=_warm_up_arg, default=None, metavar="N|auto",
                            help="first steps every learned schedule computes in full (default auto: 10%% of the "
                                 "steps with a flow-matching sampler, none otherwise)")

    d = sub.add_parser("demo", help="learn, compile and compare a schedule on a bundled model (a few minutes on CPU)",
                       description="Learn a schedule for a bundled model, compile it, sample with and without it "
                                   "from the same noise, and write a side-by-side PNG, a schedule heatmap, the "
                                   "schedule JSON and a report. flux-digits samples with Euler flow matching "
                                   "(FluxPipeline's sigmas) and caches whole blocks; the others with DDIM by default.")
    common(d, forecast=True)
    d.add_argument("--steps", type=int, default=20, help="sampling steps")
    d.add_argument("--scheduler", default=None, choices=list(SCHEDULER_NAMES),
                   help="sampler (default: ddim; flow-euler for flux-digits, the only one that fits it)")
    d.add_argument("--budget", type=float, default=0.5, help="fraction of branch FLOPs to remove, in (0, 1)")
    d.add_argument("--iterations", type=int, default=None,
                   help="router training iterations (default: the learner's, 12)")
    d.add_argument("--batch", type=int, default=None, help="images per training trajectory (default 4; flux-digits 2)")
    d.add_argument("--calibration-samples", type=int, default=None,
                   help="images the learner chooses among its best candidates on, never searched on (default 16; "
                         "candidates are searched on 4 others)")
    d.add_argument("--samples", type=int, default=16, help="images to sample for the comparison")
    d.add_argument("--repeats", type=int, default=3, help="timed sampling runs (median reported)")
    d.add_argument("--out", default="l2c-demo", help="output folder")
    d.set_defaults(func=cmd_demo)

    def target(sp):
        sp.add_argument("--pipeline", default=None, metavar="DIR",
                        help="a local diffusers pipeline folder (save_pretrained), loaded offline, instead of a "
                             "bundled model")
        sp.add_argument("--labels", type=int, nargs="+", default=None, help="class labels (DiT pipelines)")
        sp.add_argument("--prompts", default=None, metavar="FILE", help="prompts, one per line (PixArt pipelines)")
        sp.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
        sp.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
        sp.add_argument("--guidance-scale", type=float, default=None,
                        help="guidance scale (default: the pipeline's, or the bundled model's recommended; "
                             "Flux.1-dev pipelines: the distilled guidance embedding)")
        sp.add_argument("--true-cfg-scale", type=float, default=None,
                        help="FluxPipeline's true classifier-free guidance scale (needs --negative-prompt)")
        sp.add_argument("--negative-prompt", default=None,
                        help="FluxPipeline's negative prompt for true CFG ('' is the empty prompt)")
        sp.add_argument("--device", default="cpu", help="where the model runs and learns (cpu, cuda, cuda:1, ...)")
        sp.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights dtype (the router is fp32)")

    lp = sub.add_parser("learn", help="learn a schedule for a bundled model or a diffusers pipeline and save it",
                        description="Train the L2C router along the sampler's trajectory and rank its scores to a "
                                    "FLOPs budget. Bundled models learn with classifier-free guidance at their "
                                    "recommended scale; flux-digits with Euler flow matching, one unit per block, "
                                    "and smaller learning defaults (12 iterations of 2 images, 4 calibration images).")
    common(lp, model=False, forecast=True)
    lp.add_argument("--model", default=None,
                    help="bundled model (dit-digits, pixart-digits, flux-digits; default dit-digits) when no "
                         "--pipeline is given")
    target(lp)
    lp.add_argument("--steps", type=int, default=20)
    lp.add_argument("--scheduler", default=None, choices=list(SCHEDULER_NAMES),
                    help="sampler (default: the pipeline's own; ddim for bundled models, flow-euler for flux-digits)")
    lp.add_argument("--budget", type=float, nargs="+", default=None,
                    help="fraction of branch FLOPs to remove, in (0, 1) (default 0.4); several (e.g. 0.35 0.5 0.67 "
                         "0.75) learn a front in one run, sharing its measurements, written as OUTPUT with .b35, "
                         ".b50, ... before .l2c.json")
    lp.add_argument("--speedup", type=float, nargs="+", default=None,
                    help="instead of --budget: speed targets (e.g. 1.5 2 3 4), each turned into the budget that "
                         "runs that many times faster than full compute on this device and batch (a fully reused "
                         "step is timed against a full one first; a target out of reach is refused before "
                         "learning); written as OUTPUT with .1.5x, .2x, ... before .l2c.json")
    lp.add_argument("--speed-check", type=int, default=None, metavar="ROUNDS",
                    help="with --speedup: timed rounds (default 0: off) that check each learned schedule's speedup "
                         "against full compute afterwards; a target the check shows misplaced by a computed step or "
                         "more is learned once more at the budget the check's timings give. 0: no check")
    lp.add_argument("--iterations", type=int, default=None, help="router training iterations (default: the learner's, 12)")
    lp.add_argument("--batch", type=int, default=None, help="images per training trajectory (default 4; flux-digits 2)")
    lp.add_argument("--calibration-samples", type=int, default=None,
                    help="images the learner chooses among its best candidates on, never searched on (default 16; "
                         "candidates are searched on 4 others)")
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
    target(bp)
    bp.add_argument("--scheduler", default=None, choices=list(SCHEDULER_NAMES),
                    help="sampler (default: the one the schedule was learned with; flow-euler for flux-digits)")
    bp.add_argument("--samples", type=int, default=16)
    bp.add_argument("--repeats", type=int, default=3)
    bp.set_defaults(func=cmd_bench)
    return p


def main(argv=None) -> int:
    from .models.registry import MODEL_NAMES
    from .schedule import ScheduleError

    args = build_parser().parse_args(argv)
    budget = getattr(args, "budget", None)
    bad = [b for b in (budget if isinstance(budget, list) else [budget]) if b is not None and not 0.0 < b < 1.0]
    if bad:
        print(f"l2c: error: --budget must be in (0, 1) (the fraction of branch FLOPs to remove), got {bad[0]}",
              file=sys.stderr)
        return 2
    slow = [s for s in (getattr(args, "speedup", None) or []) if not s > 1.0]
    if slow:
        print(f"l2c: error: --speedup is a factor above 1 (times faster than full compute), got {slow[0]:g}",
              file=sys.stderr)
        return 2
    model = getattr(args, "model", None)
    if model is not None and model not in MODEL_NAMES:
        print(f"l2c: error: unknown model {model!r}; bundled models are {', '.join(MODEL_NAMES)}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ScheduleError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"l2c: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
