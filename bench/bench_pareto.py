"""Learned schedules against every baseline schedule and the dynamic caches people use, one model, one run.

Every method samples the same digits from the same noise (DDIM; Euler flow matching for flux-digits; CFG at the
model's recommended scale): full compute, learned L2C schedules at several budgets, the baselines of
``l2c_kernels.schedules``, the static searchers and the peers of ``bench/peers.py``. Per method: measured speedup
(median of interleaved timed runs), FLOPs removed, PSNR / SSIM against full compute, classifier accuracy. The
methods, the goal and the reading of the tables: bench/NOTES.md ("Learned schedules", "flux-digits").

    python bench/bench_pareto.py --model dit-digits --steps 20
    python bench/bench_pareto.py --model pixart-digits --steps 50 --samples 100 --time-samples 20 --repeats 5
    python bench/bench_pareto.py --model flux-digits --steps 28 --budgets 0.35 0.5 0.55 --threads 1

writes ``pareto_<model>_<steps>.{json,md,png}`` and the learned schedules under ``pareto_<model>_<steps>_schedules/``
(reused by later runs unless ``--relearn``).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path

import harness
import peers as peer_mod
import torch

import l2c_kernels as l2c
from l2c_kernels import metrics, models, schedules
from l2c_kernels.cli import _warm_up_arg
from l2c_kernels.learn.change_curves import measure_change_curves
from l2c_kernels.models import MODEL_NAMES, classifier

TARGETS = (1.5, 2.0, 3.0, 4.0)  # speedups the comparison is made at
TOLERANCE = 0.05              # "within 5%": a point counts at target T if its speedup >= (1 - 5%) T
FLOPS_TARGETS = (1 / 3, 1 / 2, 2 / 3, 3 / 4)  # FLOPs-removed fractions whose ideal speedups are 1.5x, 2x, 3x, 4x
WARM_INTERVAL = "warm-up + interval + forecast (static)"   # TaylorSeer's structure as a static schedule
BASELINE_FAMILIES = ("uniform (FORA)", "DeepCache", "first blocks (static)", "T-GATE", "Block Caching", "random",
                     WARM_INTERVAL)
#: the static searchers, re-implemented on the learner's own segment costs (l2c_kernels.learn.step_search)
SEARCHER_FAMILIES = {"dpcache": "DPCache-style search (static)", "cem": "CEM-style search (static)",
                     "lemica": "LeMiCa-style search (static)"}
LEARNED = "learned (L2C)"
#: our forecast on the FORA step pattern: not a baseline of the comparison but the ablation that shows
#: how much of the learned schedule's lead is the forecast and how much the learned mask
ABLATION = "FORA steps + our forecast (ablation)"
#: what "the learned schedule wins" means per model: the margin over every other method at 1.5x and 2x, and how
#: far its accuracy may fall below full compute's at 1.5x (flux-digits: issue 18's goal)
GOALS = {"flux-digits": dict(margin_db=1.0, accuracy_points=1.0), "flux-heldout": dict(margin_db=1.0, accuracy_points=1.0)}
DEFAULT_GOAL = dict(margin_db=0.0, accuracy_points=2.0)
MAGCACHE_SEED = 900  # MagCache is calibrated on other noise than the evaluation's (seed, seed + 1)


# ---------------------------------------------------------------------------------------------- samplers
def default_sampler(bundle) -> str:
    """The sampler a bundled model is compared with: DDIM for the DDPM models, Euler flow matching
    (``"flow-euler"``, as FluxPipeline samples) for flux-digits."""
    return "flow-euler" if getattr(bundle, "is_flow_matching", False) else "ddim"


def sampler_title(scheduler: str) -> str:
    return {"ddim": "DDIM", "flow-euler": "Euler flow matching", "dpm++": "DPM-Solver++", "euler": "Euler"}.get(
        scheduler, scheduler)


def timesteps_for(bundle, steps: int, scheduler: str) -> list[float]:
    """The timesteps the comparison's sampler passes the transformer (what a schedule must list)."""
    if scheduler == "flow-euler":
        from l2c_kernels.models import flux_digits

        return flux_digits.timesteps_for(bundle, steps)
    return models.timesteps_for(bundle, steps, scheduler)


def _learn_scheduler(scheduler: str):
    """What ``learn_schedule`` / ``measure_change_curves`` take for the comparison's sampler (None: the
    model's own, Euler flow matching for flux-digits)."""
    return None if scheduler == "flow-euler" else scheduler


def _block_weighted(schedule, model):
    """A block-level schedule of ``schedules.*`` weighs every block the same; the learned ones (``from_mask``)
    weigh each block by its own cost. Give the hand-made ones the same per-block costs so that FLOPs removed
    is counted the same way for every method (a Flux double-stream block costs more than a single one)."""
    import dataclasses

    if schedule.branches != ["block"] or schedule.unit_flops:
        return schedule
    costs = l2c.adapters.adapter_for(model, ["block"]).unit_flops(model)
    return dataclasses.replace(schedule, unit_flops=[float(f) for f in costs])


# ---------------------------------------------------------------------------------------------- methods
def baseline_schedules(bundle, steps: int, budgets, change_curves=None, scheduler: str = "ddim") -> list[tuple]:
    """``(family, label, schedule)`` for every baseline in :mod:`l2c_kernels.schedules`."""
    tr = bundle.transformer
    ts = timesteps_for(bundle, steps, scheduler)
    out = []
    for k in (2, 3, 4):
        out.append(("uniform (FORA)", f"every {k} steps", schedules.uniform(tr, ts, k)))
    for k in (2, 3):
        for fc in ("linear", "quadratic"):
            out.append((ABLATION, f"every {k} steps, {fc} forecast", schedules.uniform(tr, ts, k, forecast=fc)))
    for k in (2, 3, 4, 5, 6):
        for fc in ("linear", "taylor"):
            out.append((WARM_INTERVAL, f"first 3 steps, then every {k}, {fc}",
                        schedules.warm_up_interval(tr, ts, 3, k, forecast=fc)))
    nb = l2c.adapters.adapter_for(tr).num_blocks(tr)
    for k in (2, 3):
        if nb < 4:
            break
        out.append(("DeepCache", f"full every {k}, blocks 0-1 and {nb - 1} always",
                    schedules.deepcache(tr, ts, interval=k, keep_first=2, keep_last=1)))
    for f, k in ((2, 2), (4, 2), (2, 3), (4, 3), (6, 3)):
        if f >= nb:
            continue
        out.append(("first blocks (static)", f"F{f} every {k}", schedules.first_blocks(tr, ts, keep_first=f, interval=k)))
    if "attn2" in l2c.adapters.adapter_for(tr).branches(tr):
        for frac, fi in ((0.6, 1), (0.3, 1), (0.3, 2)):  # 0.6: the authors' PixArt setting (15 of 25 steps)
            g = max(1, round(frac * steps))
            out.append(("T-GATE", f"cross-attn for {g} steps, self-attn every 3" + (f", every {fi} after" if fi > 1 else ""),
                        schedules.tgate(tr, ts, gate_step=g, sp_interval=3, fi_interval=fi, warm_up=2)))
    # at block level these budgets count blocks (schedules.* weigh them the same); the FLOPs-removed column
    # weighs each block by its own cost (_block_weighted)
    what = "of blocks reused" if l2c.adapters.adapter_for(tr).branches(tr) == ["block"] else "removed"
    if change_curves is not None:
        for b in budgets:
            out.append(("Block Caching", f"{100 * b:.0f}% {what}", schedules.block_caching(tr, ts, change_curves, b)))
    for b in budgets:
        out.append(("random", f"{100 * b:.0f}% {what}", schedules.random_schedule(tr, ts, b, seed=0)))
    return [(f, label, _block_weighted(s, tr)) for f, label, s in out]


def learned_schedules(bundle, steps: int, budgets, cfg: float, out_dir: Path | None, relearn: bool = False,
                      scheduler: str = "ddim", log=print, **learn_kwargs) -> list[tuple]:
    """``(family, label, schedule)`` for the learned front (every budget in one ``learn_schedule(budgets=...)`` call)
    and, at every budget, the static searchers on the learner's own segment costs (DPCache-, CEM-, LeMiCa-style);
    all cached as JSON in ``out_dir`` (learned again when one is missing, or with ``relearn``)."""
    from l2c_kernels.learn import step_search

    def path(name):
        return None if out_dir is None else Path(out_dir) / f"{name}.l2c.json"

    names = [f"learned_{round(100 * b)}" for b in budgets]
    names += [f"{k}_{round(100 * b)}" for b in budgets for k in SEARCHER_FAMILIES]
    cached = {}
    if out_dir is not None and not relearn:
        for nm in names:
            if path(nm).exists():
                sc = l2c.Schedule.load(path(nm))
                if sc.num_steps == steps and (not nm.startswith("learned") or sc.params.get("cfg") == cfg):
                    cached[nm] = sc
    if any(nm not in cached for nm in names):
        shared: dict = {}
        t0 = time.time()
        front = l2c.learn_front(bundle, steps, budgets, shared=shared, cfg=cfg, scheduler=_learn_scheduler(scheduler),
                                progress=False, **learn_kwargs)
        log(f"  learned the front {list(budgets)} in {time.time() - t0:.0f} s")
        costs = next(v for k, v in shared.items() if isinstance(k, tuple) and k[0] == "segment_costs")
        tr = bundle.transformer
        ts = timesteps_for(bundle, steps, scheduler)
        for b, sc in zip(sorted(budgets), front):
            sc.params["front_seconds"] = round(time.time() - t0, 1)
            cached[f"learned_{round(100 * b)}"] = sc
            for k in SEARCHER_FAMILIES:
                fc = step_search.SEARCHERS[k][0]
                st = step_search.searcher_steps(costs, b, k)
                cached[f"{k}_{round(100 * b)}"] = schedules.computed_steps(tr, ts, st, fc, method=f"{k}-style",
                                                                           params=dict(budget=b))
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            for nm in names:
                cached[nm].save(path(nm))
    out = []
    for b in budgets:
        sc = cached[f"learned_{round(100 * b)}"]
        taken = sc.params.get("front_from_budget")
        out.append((LEARNED, f"budget {100 * b:.0f}%" + (f" (the {100 * taken:.0f}% schedule)" if taken else "")
                    + (f", {sc.forecast} forecast" if sc.forecast != "none" else ""), sc))
        for k, fam in SEARCHER_FAMILIES.items():
            sc = cached[f"{k}_{round(100 * b)}"]
            out.append((fam, f"budget {100 * b:.0f}%, {sc.forecast}", _block_weighted(sc, bundle.transformer)))
    return out


# ---------------------------------------------------------------------------------------------- running
def _quality(images, ref, labels) -> dict:
    acc = None
    if images.shape[1:] == (1, 16, 16):  # the bundled digit classifier's input
        acc = classifier.class_accuracy(images, labels)
    per = metrics.psnr_per_image(images, ref)
    return dict(psnr=metrics.psnr(images, ref), ssim=metrics.ssim(images, ref), accuracy=acc,
                worst_psnr=float(per.min()), psnr_per_image=[round(float(v), 3) for v in per])


def paired_margin(a: list | None, b: list | None) -> tuple | None:
    """``(mean, standard error)`` of the per-image PSNR differences ``a - b`` (same images, same noise): a margin
    within two standard errors is a tie on these samples. None where either row lacks per-image values."""
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return None
    d = [x - y for x, y in zip(a, b)]
    m = sum(d) / len(d)
    var = sum((x - m) ** 2 for x in d) / (len(d) - 1)
    return m, math.sqrt(var / len(d))


def _sample(bundle, tr, labels, steps, cfg, seed, scheduler):
    return models.sample(bundle, labels=labels, steps=steps, scheduler=scheduler, cfg=cfg, seed=seed,
                           transformer=tr, progress=False)


def load_average() -> float | None:
    """The machine's 1-minute load average (None where the system has none)."""
    la = harness.load_average()
    return la and la[0]


def run_methods(bundle, entries: list[dict], *, steps: int, cfg: float, labels, time_labels, repeats: int,
                seed: int, scheduler: str = "ddim", log=print, loads: list | None = None) -> list[dict]:
    """Quality pass on ``labels`` (one run per method), then ``repeats`` interleaved timed rounds on
    ``time_labels`` after one warm-up round. ``entries[i]``: family, label, transformer, and for
    schedules ``schedule``. Returns one row per entry (the first entry must be full compute)."""
    assert entries[0]["family"] == "full compute"
    ref = None
    rows = []
    for e in entries:
        tr = e["transformer"]
        if hasattr(tr, "reset"):
            tr.reset()
        t0 = time.perf_counter()
        imgs = _sample(bundle, tr, labels, steps, cfg, seed, scheduler)
        dt = time.perf_counter() - t0
        if ref is None:
            ref = imgs
        row = dict(family=e["family"], label=e["label"], kind=e.get("kind", "schedule"), params=e.get("params", {}))
        row.update(_quality(imgs, ref, labels))
        if "schedule" in e:
            row["flops_removed"] = e["schedule"].flops_removed_fraction()
        elif isinstance(tr, peer_mod.PeerTransformer):
            row["flops_removed"] = tr.flops_removed_fraction(total=False)
        else:
            row["flops_removed"] = 0.0
        row["quality_seconds"] = dt
        rows.append(row)
        log(f"  {e['family']:<36s} {e['label']:<44s} removed {100 * row['flops_removed']:5.1f}%  "
            f"PSNR {row['psnr']:6.2f}  acc {row['accuracy'] if row['accuracy'] is None else round(row['accuracy'], 3)}")

    def timed(e):
        if hasattr(e["transformer"], "reset"):
            e["transformer"].reset()
        _sample(bundle, e["transformer"], time_labels, steps, cfg, seed, scheduler)

    def after_round(k, times):  # a new order each round: a slow stretch of the machine hits different methods
        la = load_average()
        if loads is not None:
            loads.append(la)
        log(f"  timed round {k + 1}/{repeats}: full compute {times[0][-1]:.2f} s, load average {la}")
    times = harness.interleave({i: (lambda e=e: timed(e)) for i, e in enumerate(entries)}, repeats, order="shuffle",
                               seed=seed, after_round=after_round)
    ref_t = statistics.median(times[0])
    for row, t in zip(rows, times.values()):
        med = statistics.median(t)
        row.update(seconds=med, speedup=ref_t / med, seconds_all=t,
                   ideal_speedup=1.0 / max(1e-9, 1.0 - row["flops_removed"]))
    return rows


# ---------------------------------------------------------------------------------------------- summary
def _group(row) -> str:
    if row["family"] == LEARNED:
        return "learned"
    if row["family"] in BASELINE_FAMILIES:
        return "baseline"
    if row["family"] == ABLATION:
        return "ablation"
    if row["family"] in SEARCHER_FAMILIES.values():
        return "searcher"
    if row["family"] == "full compute":
        return "full"
    return "peer" if row.get("kind") == "peer" else "other"


def best_at(rows, family: str, key: str, target: float, tol: float) -> dict | None:
    """The row of ``family`` with the highest PSNR among those reaching ``key >= (1 - tol) * target``."""
    cand = [r for r in rows if r["family"] == family and r.get(key) is not None and r[key] >= (1 - tol) * target]
    return max(cand, key=lambda r: r["psnr"]) if cand else None


def summarize(rows, targets=TARGETS, tol: float = TOLERANCE, flops_targets=FLOPS_TARGETS,
              full_accuracy: float | None = None, margin_db: float = 0.0, accuracy_points: float = 2.0) -> dict:
    """For every target speedup (and FLOPs-removed fraction): the best PSNR each family reaches there,
    the learned schedule's margin over the best baseline and the best peer, and whether it wins (by more
    than ``margin_db``; the goal also wants its accuracy within ``accuracy_points`` of full compute at 1.5x)."""
    fams = []
    for r in rows:
        if r["family"] != "full compute" and r["family"] not in fams:
            fams.append(r["family"])
    out = dict(tolerance=tol, margin_goal_db=margin_db, accuracy_goal_points=accuracy_points, by_speedup=[],
               by_flops=[])
    for key, tgts, dest in (("speedup", targets, "by_speedup"), ("flops_removed", flops_targets, "by_flops")):
        for t in tgts:
            per, images = {}, {}
            for f in fams:
                b = best_at(rows, f, key, t, tol if key == "speedup" else 0.0)
                fam_rows = [r for r in rows if r["family"] == f]
                per[f] = None if b is None else dict(label=b["label"], speedup=b["speedup"], psnr=b["psnr"],
                                                     ssim=b["ssim"], accuracy=b["accuracy"],
                                                     flops_removed=b["flops_removed"])
                images[f] = None if b is None else b.get("psnr_per_image")
                if b is None:
                    per[f] = dict(unreachable=True, max_reached=max((r.get(key) or 0.0) for r in fam_rows))
            groups = {g: [f for f in fams if f in per and per[f] and not per[f].get("unreachable")
                          and _group(next(r for r in rows if r["family"] == f)) == g]
                      for g in ("learned", "baseline", "peer", "ablation", "searcher")}

            def best(g):
                c = [(per[f]["psnr"], f) for f in groups[g]]
                return max(c) if c else None

            bl, bb, bp, ba = best("learned"), best("baseline"), best("peer"), best("ablation")
            bs = best("searcher")
            entry = dict(target=t, per_family=per,
                         ablation=None if ba is None else dict(family=ba[1], **per[ba[1]]),
                         margin_over_ablation_db=None if (bl is None or ba is None) else bl[0] - ba[0],
                         learned=None if bl is None else dict(family=bl[1], **per[bl[1]]),
                         best_baseline=None if bb is None else dict(family=bb[1], **per[bb[1]]),
                         best_peer=None if bp is None else dict(family=bp[1], **per[bp[1]]),
                         best_searcher=None if bs is None else dict(family=bs[1], **per[bs[1]]),
                         margin_over_searcher_db=None if (bl is None or bs is None) else bl[0] - bs[0])
            others = [x for x in (bb, bp) if x is not None]
            entry["learned_wins"] = bool(bl is not None and all(bl[0] > o[0] for o in others))
            entry["margin_db"] = None if (bl is None or not others) else bl[0] - max(o[0] for o in others)
            if bl is not None and others:   # the paired per-image difference to the best other row, with its noise
                pm = paired_margin(images[bl[1]], images[max(others)[1]])
                if pm is not None:
                    entry["paired_margin_db"], entry["paired_margin_se_db"] = round(pm[0], 3), round(pm[1], 3)
            if margin_db > 0 and entry["margin_db"] is not None:
                entry["learned_wins"] = entry["learned_wins"] and entry["margin_db"] >= margin_db - 1e-9
            if bs is not None:   # the static searchers: the learned schedule must be no lower
                entry["learned_wins"] = entry["learned_wins"] and bl is not None and bl[0] >= bs[0]
            if key == "speedup" and full_accuracy is not None and bl is not None and per[bl[1]]["accuracy"] is not None:
                entry["accuracy_drop_points"] = 100 * (full_accuracy - per[bl[1]]["accuracy"])
            out[dest].append(entry)
    out["goal_met"] = all(e["learned_wins"] for e in out["by_speedup"])
    acc15 = [e for e in out["by_speedup"] if abs(e["target"] - 1.5) < 1e-9]
    if acc15 and acc15[0].get("accuracy_drop_points") is not None:
        ok = acc15[0]["accuracy_drop_points"] <= accuracy_points + 1e-9
        out["accuracy_within_goal_at_1_5x"] = ok
        if accuracy_points == 2.0:
            out["accuracy_within_2_points_at_1_5x"] = ok
        out["goal_met"] = out["goal_met"] and ok
    return out


def _fmt(v, f="{:.2f}"):
    if v is None:
        return "—"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f.format(v)


def _load_note(m: dict) -> str:
    la = m.get("load_average")
    if not la:
        return ""
    vals = [v for v in la.get("start_and_per_timed_round", []) + [la.get("end")] if v is not None]
    if not vals:
        return ""
    return (f" Load average (1 min) during the run: {min(vals):.1f}-{max(vals):.1f} on {m.get('cpu_count')} cores "
            f"(other work shared the machine: speedups are ratios of interleaved runs, absolute times are not "
            f"this model's speed).")


def _speed_note(m: dict) -> str:
    sp = m.get("speed_targets")
    if not sp:
        return ""
    c = sp["costs"]
    return (f" Budgets placed at the speed targets {', '.join(f'{t:g}x' for t in sp['speedups'])} before learning, "
            f"from step costs timed on this machine over a plain step (reused / computed under a schedule: "
            + ", ".join(f"{k} {v['reused']:.3f} / {v['computed']:.3f}" for k, v in c.items())
            + f"; the pooled ones used): budgets {', '.join(f'{b:.2f}' for b in m['budgets'])} (the learner "
            "and the static searchers both).")


def _paired(e: dict) -> str:
    """The paired margin cell: mean per-image difference ± two standard errors, and "tie" inside them."""
    if e.get("paired_margin_db") is None:
        return "—"
    m, se = e["paired_margin_db"], e["paired_margin_se_db"]
    return f"{m:+.2f} ± {2 * se:.2f}" + (" (tie)" if abs(m) <= 2 * se else "")


def markdown(result: dict) -> str:
    m, rows, s = result["meta"], result["rows"], result["summary"]
    full = rows[0]
    shuffled = " (methods in a new random order each round)" if m.get("round_order") == "shuffled" else ""
    lines = [f"# Learned schedules vs baselines and peers: {m['model']}, {sampler_title(m.get('scheduler', 'ddim'))} "
             f"{m['steps']} steps, CFG {m['cfg']}", "",
             f"{harness.describe(m)}. Quality: PSNR/SSIM on {m['samples']} digits (labels i mod 10, noise seed "
             f"{m['seed']}) against full compute from the same noise; classifier accuracy on {m['accuracy_samples']} "
             f"digits (seed {m['seed'] + 1}) for full compute ({_fmt(full['accuracy'], '{:.3f}')}), the learned "
             f"schedules and the best baseline and peer at each target, on the {m['samples']} for the others. Speed: "
             f"median of {m['repeats']} interleaved runs of {m['time_samples']} digits after a warm-up round"
             f"{shuffled}; "
             f"full compute {full['seconds']:.2f} s per run = 1.00x." + _load_note(m) + _speed_note(m), "",
             "## At " + ", ".join(f"{t:g}x" for t in TARGETS) + " measured speedup", "",
             f"Best PSNR each family reaches at a speedup of at least {100 * (1 - m['tolerance']):.0f}% of the target "
             "(\"cannot reach\": no setting of that method is that fast).", ""]
    best = []
    for e in s["by_speedup"]:
        for fam, v in e["per_family"].items():
            if v.get("unreachable"):
                best.append([f"{e['target']:.1f}x", fam, f"cannot reach (fastest: {v['max_reached']:.2f}x)", "", "", "",
                             "", ""])
                continue
            b = "**" if (e["learned"] and fam == e["learned"]["family"]) else ""
            best.append([f"{e['target']:.1f}x", f"{b}{fam}{b}", v["label"], f"{v['speedup']:.2f}x",
                         f"{100 * v['flops_removed']:.0f}%", f"{b}{_fmt(v['psnr'])}{b}", _fmt(v["ssim"], "{:.3f}"),
                         _fmt(v["accuracy"], "{:.3f}")])
    lines += harness.table(["target", "family", "setting", "speedup", "FLOPs removed", "PSNR (dB)", "SSIM", "accuracy"],
                           best) + [""]

    def cell(x):
        return "—" if x is None else f"{_fmt(x['psnr'])} ({x['family']}: {x['label']}, {x['speedup']:.2f}x)"
    lines += harness.table(
        ["target", "learned PSNR", "best baseline", "best peer", "margin (dB)", "paired per-image margin (dB, ± 2 SE)",
         "best static searcher", "learned - searcher (dB)", "learned wins", "ablation: FORA steps + our forecast",
         "learned - ablation (dB)"],
        [[f"{e['target']:.1f}x speedup" if e in s["by_speedup"] else f"{100 * e['target']:.0f}% FLOPs removed",
          cell(e["learned"]), cell(e["best_baseline"]), cell(e["best_peer"]), _fmt(e["margin_db"], "{:+.2f}"),
          _paired(e), cell(e.get("best_searcher")), _fmt(e.get("margin_over_searcher_db"), "{:+.2f}"),
          "yes" if e["learned_wins"] else "no", cell(e.get("ablation")),
          _fmt(e.get("margin_over_ablation_db"), "{:+.2f}")] for e in s["by_speedup"] + s["by_flops"]])
    win = "best" if not s.get("margin_goal_db") else f"best by at least {s['margin_goal_db']:g} dB"
    pts = s.get("accuracy_goal_points", 2.0)
    lines += ["", f"Goal (learned schedule {win} among baselines and peers, and no lower than the static searchers, at "
              f"every target; accuracy within {pts:g} point{'' if pts == 1 else 's'} of full at 1.5x): "
              f"**{'met' if s['goal_met'] else 'not met'}**.", "",
              f"\"{ABLATION}\" computes every branch every k steps and extrapolates in between, as the learned "
              "schedules may: it is not one of the baselines above but shows how much of the learned schedule's lead "
              "comes from the forecast and how much from the learned choice of what to compute.", "",
              "## Every method", ""]

    def acc(r):
        n = r.get("accuracy_samples")
        return _fmt(r["accuracy"], "{:.3f}") + (f" (n={n})" if n and n != m["samples"] else "")
    lines += harness.table(
        ["family", "setting", "speedup", "ideal", "FLOPs removed", "PSNR (dB)", "worst digit (dB)", "SSIM", "accuracy",
         "s/run"],
        [[r["family"], r["label"], f"{r['speedup']:.2f}x", f"{r['ideal_speedup']:.2f}x",
          f"{100 * r['flops_removed']:.1f}%", _fmt(r["psnr"]), _fmt(r.get("worst_psnr")), _fmt(r["ssim"], "{:.3f}"),
          acc(r), f"{r['seconds']:.2f}"]
         for r in sorted(rows, key=lambda r: (r["family"] != "full compute", r["family"], -r["psnr"]))])
    if result.get("unavailable"):
        lines += ["", "## Peers that could not be applied", ""]
        lines += [f"- {u['family']} ({u['setting']}): {u['reason']}" for u in result["unavailable"]]
    rc = result.get("recheck")
    if rc:
        lines += ["", f"## The rows the verdict rests on, on {rc['samples']} more digits (noise seed {rc['seed']})", "",
                  "PSNR/SSIM against full compute from that noise (speed and FLOPs from the run above)"
                  + (f"; re-scored by `{rc['command']}`." if rc.get("command") else "."), ""]
        lines += harness.table(
            ["family", "setting", "speedup", "FLOPs removed", "PSNR (dB)", "SSIM", "accuracy",
             "PSNR on the first digits"],
            [[r["family"], r["label"], f"{r['speedup']:.2f}x", f"{100 * r['flops_removed']:.1f}%", _fmt(r["psnr"]),
              _fmt(r["ssim"], "{:.3f}"), _fmt(r["accuracy"], "{:.3f}"), _fmt(r["psnr_first"])]
             for r in sorted(rc["rows"], key=lambda r: -r["psnr"])])
    unreach = sorted({(f, e["target"]) for e in s["by_speedup"] for f, v in e["per_family"].items()
                      if v.get("unreachable")})
    if unreach:
        lines += ["", "Cannot reach a target at any setting tried: " +
                  "; ".join(f"{f} at {t:.1f}x" for f, t in unreach) + "."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path:
    from l2c_kernels.plots import speed_quality

    pts = [dict(family=r["family"], speedup=r["speedup"], psnr=r["psnr"]) for r in result["rows"]
           if r["family"] != "full compute" and not math.isinf(r["psnr"])]
    m = result["meta"]
    sampler = sampler_title(m.get("scheduler", "ddim"))
    return speed_quality(pts, path, title=f"{m['model']}, {sampler} {m['steps']} steps, CFG {m['cfg']}: "
                                          f"speed vs PSNR against full compute (CPU)",
                         highlight=LEARNED, targets=TARGETS)


# ---------------------------------------------------------------------------------------------- main
def magcache_ratios(bundle, steps: int, cfg: float, scheduler: str) -> list[float]:
    """MagCache's magnitude ratios for this model, sampler, step count and guidance, calibrated (as diffusers
    documents) on one full-compute generation of digits 0-9 from noise seed ``MAGCACHE_SEED``, not the
    evaluation's noise."""
    tr = bundle.transformer
    return peer_mod.calibrate_magcache(
        tr, steps, lambda t: _sample(bundle, t, list(range(10)), steps, cfg, MAGCACHE_SEED, scheduler))


def build_entries(bundle, steps: int, cfg: float, budgets, *, out_dir: Path | None, relearn: bool, scheduler: str,
                  learn_kwargs: dict, curve_runs: int, peer_settings=None, log=print):
    tr = bundle.transformer
    entries = [dict(family="full compute", label="diffusers transformer", kind="full", transformer=tr)]
    full_sched = _block_weighted(schedules.full(tr, timesteps_for(bundle, steps, scheduler)), tr)
    entries.append(dict(family="full compute (compiled)", label="compile_schedule, nothing reused", kind="schedule",
                        schedule=full_sched, transformer=l2c.compile_schedule(tr, full_sched)))
    log("learning schedules ...")
    methods = learned_schedules(bundle, steps, budgets, cfg, out_dir, relearn, scheduler, log=log,
                                **learn_kwargs)
    curves = None
    unavailable = []
    if curve_runs > 0:
        log("measuring change curves for Block Caching ...")
        try:
            curves = measure_change_curves(bundle, steps, scheduler=_learn_scheduler(scheduler), cfg=cfg,
                                                     num_runs=curve_runs, seed=7)
        except (TypeError, ValueError, NotImplementedError) as e:  # no soft forward for this model: say so
            unavailable.append(dict(family="Block Caching", setting="all budgets",
                                    reason=f"change curves could not be measured: {type(e).__name__}: {e}"))
            log(f"  Block Caching: cannot be applied: {e}")
    methods += baseline_schedules(bundle, steps, budgets, curves, scheduler)
    for fam, label, s in methods:
        params = {k: v for k, v in s.params.items() if k not in ("scores", "history")}
        entries.append(dict(family=fam, label=label, kind="schedule", schedule=s, params=params,
                            transformer=l2c.compile_schedule(tr, s)))
    settings = peer_settings
    if settings is None:
        mag_ratios = None
        if l2c.adapters.adapter_for(tr).branches(tr) == ["block"]:  # MagCache targets Flux-like block lists
            log(f"calibrating MagCache's magnitude ratios (10 digits, noise seed {MAGCACHE_SEED}) ...")
            mag_ratios = magcache_ratios(bundle, steps, cfg, scheduler)
        settings = peer_mod.default_settings(tr, steps, mag_ratios=mag_ratios)
    for st in settings:
        try:
            p = peer_mod.make_peer(tr, st, steps)
        except peer_mod.PeerUnavailable as e:
            unavailable.append(dict(family=peer_mod.FAMILY_NAMES[st.family], setting=st.label, reason=str(e)))
            log(f"  {st.label}: cannot be applied: {e}")
            continue
        entries.append(dict(family=peer_mod.FAMILY_NAMES[st.family], label=st.label, kind="peer", params=st.params,
                            transformer=p))
    return entries, unavailable


def result_tag(model: str, steps: int, suffix: str = "") -> str:
    """File stem of one comparison's results under ``--out`` (``<tag>.json/.md/.png``, ``<tag>_schedules/``);
    ``suffix`` ``"speed"`` for fronts learned at speed targets."""
    return f"pareto_{model}_{steps}" + (f"_{suffix}" if suffix else "")


def speed_budgets(bundle, steps: int, cfg: float, scheduler: str, speedups, time_samples: int, log=print):
    """``(budgets, speed)``: the budgets that reach ``speedups`` on this machine at the timed batch
    (``l2c_kernels.learn.speed``: reused and computed steps under a schedule timed against plain ones, pooled over
    the forecasts); targets out of reach are left out, and said so."""
    from l2c_kernels.learn.conditioning import denoiser_for
    from l2c_kernels.learn.speed import budgets_for_speedups, measure_step_costs

    labels = [i % 10 for i in range(time_samples)]
    den = denoiser_for(bundle, time_samples, cfg, _learn_scheduler(scheduler), seed=0, labels=labels)
    # timed as the table times a method: one models.sample call of the timed digits
    costs = measure_step_costs(den, steps, sample=lambda m: _sample(bundle, m, labels, steps, cfg, 0, scheduler))
    log("  step costs over a plain step: " + ", ".join(
        f"{k} reused {c.reused:.3f} computed {c.computed:.3f}" for k, c in costs.items()))
    budgets, targets = [], []
    for t in sorted(speedups):
        try:
            budgets += budgets_for_speedups([t], costs["pooled"], steps)
            targets.append(t)
        except ValueError as e:
            log(f"  {e}: left out")
    return [round(b, 4) for b in budgets], dict(costs={k: c.to_dict() for k, c in costs.items()}, speedups=targets)


def guidance_scale(bundle, cfg: float | None) -> float:
    """``cfg``, or the bundled model's recommended guidance scale when None."""
    return bundle.recommended_cfg if cfg is None else float(cfg)


def run(bundle, steps: int, *, cfg: float | None = None, budgets=(0.3, 0.4, 0.5, 0.6), samples: int = 20,
        accuracy_samples: int = 100, time_samples: int = 10, repeats: int = 3, seed: int = 100,
        out: Path | None = None, relearn: bool = False, scheduler: str | None = None, learn_kwargs: dict | None = None,
        curve_runs: int = 2, peer_settings=None, speed: dict | None = None, log=print) -> dict:
    """The whole comparison for one bundled model and step count; writes the result files when ``out`` is set
    (``scheduler`` None: DDIM, or Euler flow matching for flux-digits)."""
    cfg = guidance_scale(bundle, cfg)
    scheduler = scheduler or default_sampler(bundle)
    tag = result_tag(bundle.name, steps, "speed" if speed else "")
    sched_dir = None if out is None else Path(out) / f"{tag}_schedules"
    t0 = time.time()
    entries, unavailable = build_entries(bundle, steps, cfg, budgets, out_dir=sched_dir, relearn=relearn,
                                         scheduler=scheduler, learn_kwargs=dict(learn_kwargs or {}),
                                         curve_runs=curve_runs, peer_settings=peer_settings, log=log)
    labels = [i % 10 for i in range(samples)]
    time_labels = [i % 10 for i in range(time_samples)]
    log(f"running {len(entries)} methods: quality on {samples} digits, {repeats} timed rounds on {time_samples}")
    loads = [load_average()]
    rows = run_methods(bundle, entries, steps=steps, cfg=cfg, labels=labels, time_labels=time_labels,
                       repeats=repeats, seed=seed, scheduler=scheduler, log=log, loads=loads)
    for r in rows:
        r["accuracy_samples"] = samples if r["accuracy"] is not None else 0
    if accuracy_samples > samples and rows[0]["accuracy"] is not None:
        # accuracy needs more digits than PSNR: measure it again on many for full compute, the learned
        # schedules and the best baseline/peer rows at each target
        pre = summarize(rows)
        picked = {0} | {i for i, r in enumerate(rows) if r["family"] == LEARNED}
        for e in pre["by_speedup"]:
            for k in ("best_baseline", "best_peer"):
                if e[k] is not None:
                    picked |= {i for i, r in enumerate(rows)
                               if r["family"] == e[k]["family"] and r["label"] == e[k]["label"]}
        acc_labels = [i % 10 for i in range(accuracy_samples)]
        log(f"classifier accuracy on {accuracy_samples} digits for {len(picked)} methods")
        for i in sorted(picked):
            tr = entries[i]["transformer"]
            if hasattr(tr, "reset"):
                tr.reset()
            imgs = _sample(bundle, tr, acc_labels, steps, cfg, seed + 1, scheduler)
            rows[i]["accuracy_small"] = rows[i]["accuracy"]
            rows[i]["accuracy"] = classifier.class_accuracy(imgs, acc_labels)
            rows[i]["accuracy_samples"] = accuracy_samples
    meta = harness.meta(benchmark="learned schedules vs baselines and peers", model=bundle.name, steps=steps,
                        scheduler=scheduler, cfg=cfg, samples=samples, accuracy_samples=accuracy_samples,
                        time_samples=time_samples, repeats=repeats, round_order="shuffled", seed=seed,
                        budgets=list(budgets), tolerance=TOLERANCE, cpu_count=os.cpu_count(),
                        load_average=dict(start_and_per_timed_round=loads, end=load_average()),
                        magcache_calibration_seed=MAGCACHE_SEED)
    meta["wall_seconds"] = round(time.time() - t0, 1)
    if speed:
        meta["speed_targets"] = speed
    result = dict(meta=meta, rows=rows, unavailable=unavailable,
                  summary=summarize(rows, full_accuracy=rows[0]["accuracy"], **GOALS.get(bundle.name, DEFAULT_GOAL)))
    if out is not None:
        harness.write_result(out, tag, result, markdown(result))
        plot(result, Path(out) / f"{tag}.png")
    return result


def recheck(bundle, result: dict, samples: int, seed: int, out: Path | None = None, peer_settings=None,
            log=print) -> dict:
    """PSNR/SSIM of the learned rows and of the best baseline and peer at each target speedup of a saved
    comparison, again on ``samples`` more digits from noise ``seed`` (a quality check of the rows the verdict
    rests on; speeds are not re-measured). Stored as ``result["recheck"]``; rewrites the files under ``out``.
    ``peer_settings``: the peers' grid of the run (None: the default grid, as ``run``)."""
    m = result["meta"]
    steps, cfg, scheduler = m["steps"], m["cfg"], m.get("scheduler", "ddim")
    tr = bundle.transformer
    want = {(r["family"], r["label"]) for r in result["rows"] if r["family"] == LEARNED}
    for e in result["summary"]["by_speedup"]:
        for k in ("best_baseline", "best_peer", "ablation", "best_searcher"):
            if e.get(k):
                want.add((e[k]["family"], e[k]["label"]))
    sched_dir = None if out is None else Path(out) / f"{result_tag(bundle.name, steps)}_schedules"
    found = {}
    learned = learned_schedules(bundle, steps, m["budgets"], cfg, sched_dir, scheduler=scheduler,
                                log=log) if sched_dir else []
    for fam, label, sch in learned + baseline_schedules(bundle, steps, m["budgets"], None, scheduler):
        if (fam, label) in want:
            found[(fam, label)] = l2c.compile_schedule(tr, sch)
    if any(f not in (LEARNED,) + BASELINE_FAMILIES + (ABLATION,) + tuple(SEARCHER_FAMILIES.values())
           for f, _ in want):
        settings = peer_settings
        if settings is None:
            mag = (magcache_ratios(bundle, steps, cfg, scheduler)
                   if l2c.adapters.adapter_for(tr).branches(tr) == ["block"] else None)
            settings = peer_mod.default_settings(tr, steps, mag_ratios=mag)
        for st in settings:
            key = (peer_mod.FAMILY_NAMES[st.family], st.label)
            if key in want:
                found[key] = peer_mod.make_peer(tr, st, steps)
    labels = [i % 10 for i in range(samples)]
    ref = _sample(bundle, tr, labels, steps, cfg, seed, scheduler)
    rows = []
    for (fam, label), t in sorted(found.items()):
        if hasattr(t, "reset"):
            t.reset()
        imgs = _sample(bundle, t, labels, steps, cfg, seed, scheduler)
        q = _quality(imgs, ref, labels)
        first = next(r for r in result["rows"] if r["family"] == fam and r["label"] == label)
        rows.append(dict(family=fam, label=label, psnr=q["psnr"], ssim=q["ssim"], accuracy=q["accuracy"],
                         psnr_first=first["psnr"], speedup=first["speedup"], flops_removed=first["flops_removed"]))
        log(f"  {fam:<36s} {label:<48s} PSNR {q['psnr']:6.2f} (first {first['psnr']:6.2f})")
    missing = sorted(want - set(found))
    result["recheck"] = dict(samples=samples, seed=seed, rows=rows, not_rebuilt=[list(k) for k in missing],
                             load_average=load_average(), command=harness.command())
    if out is not None:
        harness.write_result(out, result_tag(bundle.name, steps), result, markdown(result), add_meta=False)
    return result


def main(argv=None):
    ap = harness.parser(__doc__)
    ap.add_argument("--model", default="dit-digits", choices=list(MODEL_NAMES))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's recommended one)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.35, 0.5, 0.67, 0.75],
                    help="budgets of the learned front (one learn_schedule(budgets=...) call)")
    ap.add_argument("--speedups", type=float, nargs="+", default=None,
                    help="instead of --budgets: speed targets; the budgets that reach them on this machine are "
                         "measured first (learn.speed), and the results are written as pareto_<model>_<steps>_speed")
    ap.add_argument("--samples", type=int, default=20, help="digits for PSNR/SSIM (and accuracy of every method)")
    ap.add_argument("--accuracy-samples", type=int, default=100,
                    help="digits for the accuracy of full compute, the learned schedules and the best other methods")
    ap.add_argument("--time-samples", type=int, default=10, help="digits per timed run")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds (after one warm-up round)")
    ap.add_argument("--seed", type=int, default=100, help="noise seed of the evaluation (learning uses others)")
    ap.add_argument("--iterations", type=int, default=None, help="router iterations (default: learn_schedule's)")
    ap.add_argument("--refine", type=int, default=0,
                    help="calibration measurements of the learner's local search after its pick (0: none)")
    ap.add_argument("--batch-size", type=int, default=None, help="router training batch (default: learn_schedule's)")
    ap.add_argument("--calibration-samples", type=int, default=None,
                    help="samples the learner measures its candidate schedules on (default: learn_schedule's)")
    ap.add_argument("--warm-up", type=_warm_up_arg, default=None, metavar="N|auto",
                    help="first steps the learned schedules compute in full (default: learn_schedule's, auto)")
    ap.add_argument("--relearn", action="store_true", help="learn again even if saved schedules exist")
    ap.add_argument("--learn-only", action="store_true",
                    help="learn (or load) the schedules, save them and stop; a later run without --relearn "
                         "measures them (learning needs no quiet machine, the timed rounds do)")
    ap.add_argument("--replot", action="store_true",
                    help="only rewrite the Markdown table and the plot from the saved JSON of --model/--steps")
    ap.add_argument("--curve-runs", type=int, default=2,
                    help="full-compute runs (4 digits each) the Block Caching change curves are averaged over")
    ap.add_argument("--recheck", type=int, default=0,
                    help="re-score the learned rows and the best baseline and peer at each target of the saved "
                         "--model/--steps JSON on this many more digits (noise seed --seed + 2)")
    a = harness.parse(ap, argv)
    if a.replot:
        tag = Path(a.out) / result_tag(a.model, a.steps)
        res = json.loads(tag.with_suffix(".json").read_text())
        tag.with_suffix(".md").write_text(harness.with_command(markdown(res), res["meta"].get("command")))
        plot(res, tag.with_suffix(".png"))
        return res
    torch.set_num_threads(a.threads)
    from l2c_kernels.models import load

    bundle = load(a.model)
    if a.recheck:
        tag = Path(a.out) / result_tag(a.model, a.steps)
        res = json.loads(tag.with_suffix(".json").read_text())
        return recheck(bundle, res, a.recheck, a.seed + 2, out=Path(a.out), log=harness.log)
    learn_kwargs = {} if a.iterations is None else dict(iterations=a.iterations)
    if a.calibration_samples is not None:
        learn_kwargs["calibration_samples"] = a.calibration_samples
    if a.batch_size is not None:
        learn_kwargs["batch_size"] = a.batch_size
    if a.refine:
        learn_kwargs["refine_evaluations"] = a.refine
    if a.warm_up is not None:
        learn_kwargs["warm_up"] = a.warm_up
    speed = None
    if a.speedups:
        a.budgets, speed = speed_budgets(bundle, a.steps, guidance_scale(bundle, a.cfg), default_sampler(bundle),
                                            a.speedups, a.time_samples, log=harness.log)
        print(f"speed targets {speed['speedups']} -> budgets {a.budgets}", flush=True)
    if a.learn_only:
        learned_schedules(bundle, a.steps, a.budgets, guidance_scale(bundle, a.cfg),
                          Path(a.out) / f"{result_tag(bundle.name, a.steps, 'speed' if speed else '')}_schedules",
                          a.relearn, scheduler=default_sampler(bundle), log=harness.log,
                          **learn_kwargs)
        return None
    res = run(bundle, a.steps, cfg=a.cfg, budgets=a.budgets, samples=a.samples, accuracy_samples=a.accuracy_samples,
              time_samples=a.time_samples,
              repeats=a.repeats, seed=a.seed, out=Path(a.out), relearn=a.relearn, learn_kwargs=learn_kwargs,
              curve_runs=a.curve_runs, speed=speed, log=harness.log)
    print(markdown(res).split("## Every method")[0])
    return res


if __name__ == "__main__":
    main()
