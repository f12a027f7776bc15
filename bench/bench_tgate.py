"""T-GATE on the bundled pixart-digits model: our schedule (with and without CFG collapse), the automatic gate, a
learned L2C schedule and the authors' ``tgate`` package, side by side, through an unchanged ``PixArtAlphaPipeline``
with the same prompts and initial latents. Per sampler (DPM-Solver++ 25, DDIM 50, CFG): speedup (median of
interleaved generations), MACs removed (``torch.utils.flop_counter`` over one generation), PSNR / SSIM against full
compute and the digit classifier's accuracy.

    python bench/bench_tgate.py                  # writes tgate_pixart.{json,md,png}
    python bench/bench_tgate.py --quick          # small smoke run (not written unless --out is given)
"""
from __future__ import annotations

import copy
import math
import statistics
import time
import traceback
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import harness
import torch

import l2c_kernels as l2c
from l2c_kernels import metrics, models, schedules
from l2c_kernels.learn.gate import DEFAULT_OUTPUT_TOL, DEFAULT_TOL, auto_gate
from l2c_kernels.models import classifier, timesteps_for
from l2c_kernels.models.pipelines import pixart_pipeline
from l2c_kernels.models.text_encoder import CAPTION_TEMPLATES, caption_for
from l2c_kernels.runtime.plan import collapsible_steps
from l2c_kernels.sampling import initial_noise

#: the T-GATE authors' PixArt setting (25 steps); the gate scales with the step count
AUTHORS = dict(gate_step=15, sp_interval=3, fi_interval=1, warm_up=2)


def eval_prompts(n: int) -> tuple[list[str], list[int]]:
    """``n`` captions cycling over the digits and the caption templates."""
    labels = [i % 10 for i in range(n)]
    return [caption_for(l, (i // 10) % len(CAPTION_TEMPLATES)) for i, l in enumerate(labels)], labels


def calibration_prompts(n: int = 8, seed: int = 1) -> list[str]:
    """Calibration captions for the automatic gate, drawn apart from the evaluation set."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g).tolist()
    temps = torch.randint(0, len(CAPTION_TEMPLATES), (n,), generator=g).tolist()
    return [caption_for(l, t) for l, t in zip(labels, temps)]


@dataclass
class Row:
    name: str
    transformer: torch.nn.Module | None = None  # run through our pipeline
    schedule: l2c.Schedule | None = None
    note: str = ""
    official: tuple | None = None  # (pipe, kwargs) of the authors' package, run instead
    error: str | None = None


def run_row(row: Row, pipe, prompts, steps, cfg, latents) -> torch.Tensor:
    """Images in [-1, 1] for ``prompts``."""
    kw = dict(num_inference_steps=steps, guidance_scale=cfg, latents=latents.clone(), use_resolution_binning=False,
              max_sequence_length=8, clean_caption=False, output_type="pt")
    if row.official is not None:
        opipe, okw = row.official
        return opipe.tgate(prompts, **kw, **okw).images.float() * 2 - 1
    pipe.transformer = row.transformer
    if hasattr(row.transformer, "reset"):
        row.transformer.reset()
    return pipe(prompts, **kw).images.float() * 2 - 1


def schedule_macs_estimate(sched, collapse: bool) -> float:
    """Fraction of branch MACs removed by ``sched`` (batch halved at collapsible steps when ``collapse``)."""
    w = [float(sched.branch_flops[b]) for b in sched.branches]
    coll = collapsible_steps(sched) if collapse else [False] * sched.num_steps
    done = 0.0
    for s, row in enumerate(sched.compute_mask()):
        done += sum(sum(wi for wi, c in zip(w, blk) if c) for blk in row) * (0.5 if coll[s] else 1.0)
    return 1.0 - done / (sum(w) * sched.num_blocks * sched.num_steps)


def bench_sampler(bundle, sampler: str, steps: int, args, log) -> dict:
    model = bundle.transformer
    cfg = args.cfg if args.cfg is not None else bundle.recommended_cfg
    ts = timesteps_for(bundle, steps, sampler)
    hand = dict(AUTHORS, gate_step=round(AUTHORS["gate_step"] * (steps / 25)))
    sp = {k: v for k, v in hand.items() if k != "gate_step"}
    pipe = pixart_pipeline(bundle, scheduler=sampler)
    pipe.set_progress_bar_config(disable=True)
    tag = f"[{sampler} {steps}]"

    t0 = time.perf_counter()
    cal = calibration_prompts(args.calibration)
    gate = auto_gate(bundle, steps, sampler, prompts=cal, criterion="output", tol=args.output_tol, cfg=cfg, seed=1,
                     full_curve=True, **sp)
    gate_seconds = time.perf_counter() - t0
    gate_c = auto_gate(bundle, steps, sampler, prompts=cal, criterion="attn2_change", tol=args.tol, cfg=cfg, seed=1)
    log(f"{tag} auto gate {gate.gate_step} (output error <= {gate.tol}), {gate.gate_step} (hand-set "
        f"{hand['gate_step']}), {gate_seconds:.1f} s; error per gate " + " ".join(f"{v:.3f}" for v in gate.curve[1:]))
    log(f"{tag} auto gate from cross-attention change {gate_c.gate_step} (tol {gate_c.tol:.4f}); "
        "curve " + " ".join(f"{v:.4f}" for v in gate_c.curve[1:]))
    s_hand = schedules.tgate(model, ts, **hand)
    s_auto = schedules.tgate(model, ts, gate_step=gate, **sp)
    s_auto_c = schedules.tgate(model, ts, gate_step=gate_c, **sp)

    def ours(name, s, note="", **kw):
        return Row(name, l2c.compile_schedule(model, s, **kw), s, note)
    g = hand["gate_step"]
    rows = [Row("full compute", model, note="original diffusers transformer"),
            ours(f"T-GATE gate {g} (no CFG collapse)", s_hand, cfg_collapse=False),
            ours(f"T-GATE gate {g} + CFG collapse", s_hand),
            ours(f"T-GATE auto gate {gate.gate_step} (output error) + CFG collapse", s_auto,
                 f"calibration error <= {gate.tol} on {len(cal)} other prompts"),
            ours(f"T-GATE auto gate {gate_c.gate_step} (cross-attn change) + CFG collapse", s_auto_c,
                 f"step-to-step change < {gate_c.tol:.3f}")]
    # learned L2C schedule at the MACs T-GATE with collapse removes (branch MACs)
    budget = round(schedule_macs_estimate(s_hand, collapse=True), 3)
    lpath = (Path(args.out or harness.RESULTS) / "tgate_pixart_schedules"
             / f"learned_{sampler.replace('+', 'p')}{steps}.l2c.json")
    if lpath.exists() and not args.relearn:
        s_learn = l2c.Schedule.load(lpath)
    else:
        t0 = time.perf_counter()
        s_learn = l2c.learn_schedule(bundle, steps, budget=budget, scheduler=sampler, cfg=cfg,
                                     iterations=args.learn_iterations, progress=False)
        log(f"{tag} learned schedule (budget {budget}) in {time.perf_counter() - t0:.0f} s")
        if args.out is not None or not args.quick:
            lpath.parent.mkdir(parents=True, exist_ok=True)
            s_learn.save(lpath)
    rows.append(ours(f"L2C learned, {100 * budget:.0f}% branch MACs", s_learn,
                     f"attn2 reused in {s_learn.summary()['removed_per_branch'].get('attn2', 0):.0%} of its cells"))
    off = Row(f"official tgate {(harness.versions()['tgate'] or '(not installed)')} gate {g}")
    try:
        import tgate

        b2 = copy.copy(bundle)
        b2.transformer = copy.deepcopy(model)  # the package replaces Attention.forward in place
        opipe = tgate.TgatePixArtAlphaLoader(pixart_pipeline(b2, scheduler=sampler))
        opipe.set_progress_bar_config(disable=True)
        off.official = (opipe, hand)
    except Exception as e:  # noqa: BLE001
        off.error = f"{type(e).__name__}: {e}"
    rows.append(off)

    prompts, labels = eval_prompts(args.samples)
    shape = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
    latents = initial_noise(args.samples, shape, seed=0)
    tprompts, tlatents = prompts[: args.timing_batch], latents[: args.timing_batch]
    images = {}  # on the evaluation set (one run each; also the warm-up)
    for r in rows:
        if r.error:
            continue
        try:
            images[r.name] = run_row(r, pipe, prompts, steps, cfg, latents)
        except Exception as e:  # noqa: BLE001
            r.error = f"{type(e).__name__}: {e}"
            log(traceback.format_exc())
    ref = images[rows[0].name]
    live = [r for r in rows if r.error is None]
    macs = {r.name: harness.flops(lambda r=r: run_row(r, pipe, tprompts[:2], steps, cfg, tlatents[:2]),
                                  custom=False) // 2 for r in live}  # of one generation of 2 timing images
    times = harness.interleave({r.name: (lambda r=r: run_row(r, pipe, tprompts, steps, cfg, tlatents)) for r in live},
                               args.repeats, after_round=lambda k, t: log(f"{tag} repeat {k + 1}: " + ", ".join(
                                   f"{n.split(' (')[0][:24]} {v[-1]:.2f}s" for n, v in t.items())))
    t_full = statistics.median(times[rows[0].name])
    out_rows = []
    for r in rows:
        d = dict(name=r.name, note=r.note)
        out_rows.append(d)
        if r.schedule is not None:
            d.update(schedule_method=r.schedule.method, gate_step=r.schedule.params.get("gate_step"),
                     branch_macs_removed_estimate=round(schedule_macs_estimate(
                         r.schedule, collapse=getattr(r.transformer, "collapsible", [False])[-1:] == [True]), 4),
                     collapsible_steps=sum(getattr(r.transformer, "collapsible", [])))
        if r.error is not None:
            d.update(error=r.error)
            continue
        med, img = statistics.median(times[r.name]), images[r.name]
        d.update(seconds=round(med, 4), spread=harness.spread(times[r.name], digits=4),
                 speedup=round(t_full / med, 3), macs_per_generation=macs[r.name],
                 macs_removed=round(1 - macs[r.name] / macs[rows[0].name], 4),
                 psnr=round(metrics.psnr(img, ref), 2) if r is not rows[0] else math.inf,
                 ssim=round(metrics.ssim(img, ref), 4), accuracy=round(classifier.class_accuracy(img, labels), 4))
        if r.official is not None:
            d["psnr_vs_ours_collapse"] = round(metrics.psnr(img, images[rows[2].name]), 2)
    return dict(sampler=sampler, steps=steps, cfg=cfg, date=str(date.today()), timesteps=ts, hand_setting=hand,
                auto_gate=dict(gate.to_dict(), seconds=round(gate_seconds, 1)), auto_gate_attn2_change=gate_c.to_dict(),
                rows=out_rows, images={r.name: images[r.name][:10] for r in rows if r.name in images})


def write_markdown(result: dict) -> str:
    md = ["# T-GATE on pixart-digits: our schedule with CFG collapse, automatic gate, learned, official package", "",
          f"{harness.describe({**result, **result.get('meta', {})})}, tgate {result['tgate']}. Unchanged "
          f"`PixArtAlphaPipeline` around the bundled model; {result['samples']} evaluation images (digits 0-9, caption "
          "templates cycled), same initial latents for every row; speedup = median of "
          f"{result['repeats']} interleaved generations of {result['timing_batch']} images (CFG batch "
          f"{2 * result['timing_batch']}) in one process; MACs counted with torch.utils.flop_counter over one "
          "generation; accuracy = bundled digit classifier reads the asked-for digit.", ""]
    for s in result["samplers"]:
        g, gc = s["auto_gate"], s["auto_gate_attn2_change"]
        measured = f" (measured {s['date']})" if "date" in s else ""
        md += [f"## {s['sampler']} {s['steps']} steps, CFG {s['cfg']}{measured}", "",
               f"Hand-set (authors' PixArt setting scaled to {s['steps']} steps): {s['hand_setting']}. "
               f"Automatic gate from the output error of gating (relative RMS error of {len(g['prompts'])} calibration "
               f"samples <= {g['tol']}): {g['gate_step']}, measured in {g['seconds']} s. Automatic gate from the "
               f"cross-attention output's step-to-step change (< {gc['tol']:.4f}): {gc['gate_step']}.", "",
               "Calibration error per gate: " + " ".join(f"{i}:{v:.3f}" for i, v in enumerate(g["curve"])
                                                         if v is not None), "",
               "Cross-attention change per step: " + " ".join(f"{v:.4f}" for v in gc["curve"] if v is not None), ""]
        rows = []
        for r in s["rows"]:
            if "error" in r:
                rows.append([r["name"]] + ["—"] * 5 + [f"did not run: {r['error']}"])
                continue
            note = r.get("note", "")
            if "psnr_vs_ours_collapse" in r:
                note = (note + "; " if note else "") + f"PSNR vs our T-GATE + collapse {r['psnr_vs_ours_collapse']} dB"
            rows.append([r["name"], f"{r['speedup']:.2f}x ({r['seconds']:.2f} s)", f"{100 * r['macs_removed']:.1f}%",
                         "—" if math.isinf(r["psnr"]) else f"{r['psnr']:.2f}", f"{r['ssim']:.4f}",
                         f"{100 * r['accuracy']:.1f}%", note])
        md += harness.table(["method", "speedup", "MACs removed", "PSNR (dB)", "SSIM", "accuracy", "note"], rows)
        md.append("")
    if result.get("goals"):
        md += ["## Goals (DPM-Solver++ 25 steps)", ""] + [f"- {k}: {v}" for k, v in result["goals"].items()] + [""]
    return "\n".join(md)


def goals(result: dict) -> dict:
    s = next(x for x in result["samplers"] if x["steps"] == 25)
    full, ours = s["rows"][0], s["rows"][2]
    off = next(r for r in s["rows"] if r["name"].startswith("official"))
    out = {"T-GATE + CFG collapse >= 1.6x faster than full":
           f"{'met' if ours['speedup'] >= 1.6 else 'NOT met'} ({ours['speedup']:.2f}x)",
           "accuracy within 2 points of full":
           f"{'met' if abs(ours['accuracy'] - full['accuracy']) <= 0.02 else 'NOT met'} "
           f"({100 * ours['accuracy']:.1f}% vs {100 * full['accuracy']:.1f}%)"}
    ok = "error" not in off and ours["speedup"] >= off["speedup"] and ours["psnr"] >= off["psnr"] - 0.05
    out["at least as fast as the official package at equal or better PSNR"] = (
        "official package did not run" if "error" in off else
        f"{'met' if ok else 'NOT met'} (ours {ours['speedup']:.2f}x / {ours['psnr']:.2f} dB, official "
        f"{off['speedup']:.2f}x / {off['psnr']:.2f} dB)")
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(result["samplers"])
    fig, axes = plt.subplots(2, n, figsize=(6.2 * n, 8.4), squeeze=False)
    for j, s in enumerate(result["samplers"]):
        ax = axes[0, j]
        for k, r in enumerate(s["rows"]):
            if "error" in r or math.isinf(r["psnr"]):
                continue
            official = r["name"].startswith("official")
            ax.scatter(r["speedup"], r["psnr"], s=90 if official else 45, marker="x" if official else "o",
                       color=f"C{k}", label=f"{r['name']}: {100 * r['accuracy']:.0f}% acc.", zorder=3)
        ax.set(xlabel="measured speedup over full compute (CPU)", ylabel="PSNR vs full compute (dB)")
        ax.set_title(f"{s['sampler']} {s['steps']} steps (full compute: "
                     f"{100 * s['rows'][0]['accuracy']:.0f}% accuracy)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        ax = axes[1, j]
        g, gc, hand = s["auto_gate"], s["auto_gate_attn2_change"], s["hand_setting"]["gate_step"]
        xs = [i for i, v in enumerate(g["curve"]) if v is not None]
        ax.plot(xs, [g["curve"][i] for i in xs], marker=".", color="C0",
                label="calibration error when gating at this step")
        ax.axhline(g["tol"], color="C0", ls="--", lw=0.8, label=f"tolerance {g['tol']}")
        ax.plot(range(1, len(gc["curve"])), gc["curve"][1:], marker=".", color="C1",
                label="cross-attention change from the previous step")
        ax.axhline(gc["tol"], color="C1", ls="--", lw=0.8, label=f"tolerance {gc['tol']:.3f}")
        ax.axvline(g["gate_step"], color="C2", label=f"automatic gate (output error) {g['gate_step']}")
        ax.axvline(gc["gate_step"], color="C4", ls="-.", label=f"automatic gate (cross-attn change) {gc['gate_step']}")
        ax.axvline(hand, color="C3", ls=":", label=f"hand-set gate {hand}")
        ax.set(yscale="log", xlabel="sampling step", ylabel="relative change / relative error")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = harness.parser(__doc__, out=None)
    ap.add_argument("--samples", type=int, default=200, help="evaluation images (quality and accuracy)")
    ap.add_argument("--timing-batch", type=int, default=20, help="images per timed generation")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calibration", type=int, default=8, help="calibration prompts for the automatic gate")
    ap.add_argument("--tol", type=float, default=DEFAULT_TOL, help="tolerance of the cross-attention change gate")
    ap.add_argument("--output-tol", type=float, default=DEFAULT_OUTPUT_TOL, help="tolerance of the output-error gate")
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's recommended one)")
    ap.add_argument("--learn-iterations", type=int, default=60)
    ap.add_argument("--relearn", action="store_true", help="learn the L2C schedules again even if saved")
    ap.add_argument("--samplers", default="dpm++:25,ddim:50")
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--out", default=None, help=f"output directory (default {harness.RESULTS})")
    args = harness.parse(ap, argv)
    if args.quick:
        args.samples, args.timing_batch, args.repeats, args.learn_iterations = 20, 4, 1, 4
    out = Path(args.out or harness.RESULTS)
    bundle = models.load("pixart-digits")
    samplers = [(a, int(b)) for a, b in (x.split(":") for x in args.samplers.split(","))]
    result = dict(benchmark="T-GATE on pixart-digits", tgate=(harness.versions()["tgate"] or "(not installed)"), samples=args.samples,
                  timing_batch=args.timing_batch, repeats=args.repeats,
                  model_training=dict(steps=bundle.info.get("steps"), minutes=bundle.info.get("minutes")), samplers=[])
    all_images = {}
    for sampler, steps in samplers:
        r = bench_sampler(bundle, sampler, steps, args, harness.log)
        all_images[f"{sampler} {steps}"] = r.pop("images")
        result["samplers"].append(r)
    if any(s["steps"] == 25 for s in result["samplers"]):
        result["goals"] = goals(result)
    result["meta"] = harness.meta()
    md = write_markdown(result)
    print(md)
    if args.quick and args.out is None:
        return result
    harness.write_result(out, "tgate_pixart", result, md)
    plot(result, out / "tgate_pixart.png")
    from l2c_kernels.plots import side_by_side

    for key, imgs in all_images.items():
        side_by_side(imgs, out / f"tgate_samples_{key.replace(' ', '_').replace('+', 'p')}.png")
    return result


if __name__ == "__main__":
    main()
