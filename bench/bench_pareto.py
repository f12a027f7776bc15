"""Learned schedules against every baseline schedule and the dynamic caches people use, one model, one run.

Every method samples the same digits from the same noise (DDIM; Euler flow matching for flux-digits; CFG at the
model's recommended scale): full compute, learned L2C schedules at several budgets, the baselines of
``l2c_kernels.schedules``, the static searchers and the peers of ``bench/peers.py``. Per method: measured speedup
(median of interleaved timed runs), FLOPs removed, PSNR / SSIM against full compute, classifier accuracy. The
methods, the goal and the reading of the tables: bench/NOTES.md ("Learned schedules", "flux-digits").

    python bench/bench_pareto.py --model flux-heldout --steps 28 --threads 1 --samples 40 --speedups 1.5 2 3 4
    python bench/bench_pareto.py --model flux-digits --steps 28 --budgets 0.35 0.5 0.55 --threads 1

writes ``pareto_<model>_<steps>.{json,md,png}`` and the learned schedules under ``pareto_<model>_<steps>_schedules/``
(reused by later runs unless ``--relearn``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from pathlib import Path

import harness
import peers as peer_mod

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
GOALS = dict.fromkeys(("flux-digits", "flux-heldout"), dict(margin_db=1.0, accuracy_points=1.0))
DEFAULT_GOAL = dict(margin_db=0.0, accuracy_points=2.0)
MAGCACHE_SEED = 900  # MagCache is calibrated on other noise than the evaluation's (seed, seed + 1)
#: the side of the comparison each family of schedules is on (any other row: "peer" where its kind says so)
GROUPS = {LEARNED: "learned", ABLATION: "ablation", "full compute": "full",
          **dict.fromkeys(BASELINE_FAMILIES, "baseline"), **dict.fromkeys(SEARCHER_FAMILIES.values(), "searcher")}
SAMPLER_TITLES = {"ddim": "DDIM", "flow-euler": "Euler flow matching", "dpm++": "DPM-Solver++", "euler": "Euler"}


# ---------------------------------------------------------------------------------------------- samplers
def default_sampler(bundle) -> str:
    """DDIM for the DDPM models, Euler flow matching (``"flow-euler"``, as FluxPipeline samples) for flux-digits."""
    return "flow-euler" if getattr(bundle, "is_flow_matching", False) else "ddim"


def _learn_scheduler(scheduler: str):
    """The learner's name for the sampler (None: the model's own, Euler flow matching for flux-digits)."""
    return None if scheduler == "flow-euler" else scheduler


def _block_weighted(schedule, model):
    """A hand-made block-level schedule with each block's own cost (as the learned ones have), so that FLOPs removed
    is counted alike for every method (a Flux double-stream block costs more than a single one)."""
    if schedule.branches != ["block"] or schedule.unit_flops:
        return schedule
    costs = l2c.adapters.adapter_for(model, ["block"]).unit_flops(model)
    return dataclasses.replace(schedule, unit_flops=[float(f) for f in costs])


# ---------------------------------------------------------------------------------------------- methods
def baseline_schedules(bundle, steps: int, budgets, change_curves=None, scheduler: str = "ddim") -> list[tuple]:
    """``(family, label, schedule)`` for every baseline in :mod:`l2c_kernels.schedules`."""
    tr = bundle.transformer
    ts = models.timesteps_for(bundle, steps, scheduler)
    ad = l2c.adapters.adapter_for(tr)
    nb, branches = ad.num_blocks(tr), ad.branches(tr)
    out = [("uniform (FORA)", f"every {k} steps", schedules.uniform(tr, ts, k)) for k in (2, 3, 4)]
    out += [(ABLATION, f"every {k} steps, {fc} forecast", schedules.uniform(tr, ts, k, forecast=fc))
            for k in (2, 3) for fc in ("linear", "quadratic")]
    out += [(WARM_INTERVAL, f"first 3 steps, then every {k}, {fc}",
             schedules.warm_up_interval(tr, ts, 3, k, forecast=fc))
            for k in (2, 3, 4, 5, 6) for fc in ("linear", "taylor")]
    out += [("DeepCache", f"full every {k}, blocks 0-1 and {nb - 1} always",
             schedules.deepcache(tr, ts, interval=k, keep_first=2, keep_last=1)) for k in (2, 3) if nb >= 4]
    out += [("first blocks (static)", f"F{f} every {k}", schedules.first_blocks(tr, ts, keep_first=f, interval=k))
            for f, k in ((2, 2), (4, 2), (2, 3), (4, 3), (6, 3)) if f < nb]
    if "attn2" in branches:
        for frac, fi in ((0.6, 1), (0.3, 1), (0.3, 2)):  # 0.6: the authors' PixArt setting (15 of 25 steps)
            g = max(1, round(frac * steps))
            after = f", every {fi} after" if fi > 1 else ""
            out.append(("T-GATE", f"cross-attn for {g} steps, self-attn every 3{after}",
                        schedules.tgate(tr, ts, gate_step=g, sp_interval=3, fi_interval=fi, warm_up=2)))
    # at block level these budgets count blocks (schedules.* weigh them the same); the FLOPs-removed column
    # weighs each block by its own cost (_block_weighted)
    what = "of blocks reused" if branches == ["block"] else "removed"
    if change_curves is not None:
        out += [("Block Caching", f"{100 * b:.0f}% {what}", schedules.block_caching(tr, ts, change_curves, b))
                for b in budgets]
    out += [("random", f"{100 * b:.0f}% {what}", schedules.random_schedule(tr, ts, b, seed=0)) for b in budgets]
    return [(f, label, _block_weighted(s, tr)) for f, label, s in out]


def learned_schedules(bundle, steps: int, budgets, cfg: float, out_dir: Path | None, relearn: bool = False,
                      scheduler: str = "ddim", log=print, **learn_kwargs) -> list[tuple]:
    """``(family, label, schedule)`` for the learned front (every budget in one ``learn_front`` call) and, at every
    budget, the static searchers on the learner's own segment costs; all cached as JSON in ``out_dir`` (learned
    again when one is missing, or with ``relearn``)."""
    from l2c_kernels.learn import step_search

    names = [f"{k}_{round(100 * b)}" for k in ("learned", *SEARCHER_FAMILIES) for b in budgets]
    paths = {} if out_dir is None else {nm: Path(out_dir) / f"{nm}.l2c.json" for nm in names}
    cached = {}
    for nm, path in ({} if relearn else paths).items():
        sc = l2c.Schedule.load(path) if path.exists() else None
        if sc is not None and sc.num_steps == steps and (not nm.startswith("learned") or sc.params.get("cfg") == cfg):
            cached[nm] = sc
    if any(nm not in cached for nm in names):
        shared: dict = {}
        t0 = time.time()
        front = l2c.learn_front(bundle, steps, budgets, shared=shared, cfg=cfg, scheduler=_learn_scheduler(scheduler),
                                progress=False, **learn_kwargs)
        log(f"  learned the front {list(budgets)} in {time.time() - t0:.0f} s")
        costs = next(v for k, v in shared.items() if isinstance(k, tuple) and k[0] == "segment_costs")
        ts = models.timesteps_for(bundle, steps, scheduler)
        for b, sc in zip(sorted(budgets), front):
            sc.params["front_seconds"] = round(time.time() - t0, 1)
            cached[f"learned_{round(100 * b)}"] = sc
            for k in SEARCHER_FAMILIES:
                st = step_search.searcher_steps(costs, b, k)
                cached[f"{k}_{round(100 * b)}"] = schedules.computed_steps(
                    bundle.transformer, ts, st, step_search.SEARCHERS[k][0], method=f"{k}-style", params=dict(budget=b))
        for nm, path in paths.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            cached[nm].save(path)
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
    """PSNR / SSIM against ``ref``, and the digit classifier's accuracy where the images fit its input."""
    acc = classifier.class_accuracy(images, labels) if images.shape[1:] == (1, 16, 16) else None
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


def _sample(bundle, tr, labels, steps, cfg, seed, scheduler, reset=False):
    """``models.sample`` with ``tr`` (``reset``: a peer's or compiled schedule's state forgotten first)."""
    if reset and hasattr(tr, "reset"):
        tr.reset()
    return models.sample(bundle, labels=labels, steps=steps, scheduler=scheduler, cfg=cfg, seed=seed,
                         transformer=tr, progress=False)


def load_average() -> float | None:
    return (harness.load_average() or [None])[0]  # the 1-minute one


def _work_key(entry: dict, index: int):
    """What a timed run executes: a schedule's step plans (which units each step computes, in any order: a step
    costs the same whichever timestep it is), its forecast and cross-attention cache; not its name, timesteps or
    learning notes. Any other method (full compute, a peer) is its own."""
    s = entry.get("schedule")
    if s is None or entry["family"] == "full compute":
        return ("method", index)
    steps = sorted(json.dumps(row) for row in s.compute_mask())
    return json.dumps(dict(branches=s.branches, blocks=s.num_blocks, forecast=s.forecast, attn2=s.attn2_cache,
                           steps=steps))


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
        ref = imgs if ref is None else ref
        row = dict(family=e["family"], label=e["label"], kind=e.get("kind", "schedule"), params=e.get("params", {}),
                   **_quality(imgs, ref, labels))
        # FLOPs removed: as the schedule says; a peer's as counted on this run; none for full compute
        row["flops_removed"] = (e["schedule"].flops_removed_fraction() if "schedule" in e else
                                tr.flops_removed_fraction(total=False) if isinstance(tr, peer_mod.PeerTransformer)
                                else 0.0)
        row["quality_seconds"] = dt
        rows.append(row)
        log(f"  {e['family']:<36s} {e['label']:<44s} removed {100 * row['flops_removed']:5.1f}%  "
            f"PSNR {row['psnr']:6.2f}  acc {row['accuracy'] if row['accuracy'] is None else round(row['accuracy'], 3)}")

    def after_round(k, times):  # a new order each round: a slow stretch of the machine hits different methods
        la = load_average()
        if loads is not None:
            loads.append(la)
        log(f"  timed round {k + 1}/{repeats}: full compute {times[0][-1]:.2f} s, load average {la}")
    # schedules that run the same work (a searcher's pick the learner kept; two sets of as many computed steps with
    # one forecast) are timed once: the rounds go to distinct work, and equal work cannot come out at different
    # speeds from the machine's noise (one run's time moves 5-10% on a shared 2-core machine)
    first = {}
    timed_as = [first.setdefault(_work_key(e, i), i) for i, e in enumerate(entries)]
    times = harness.interleave(
        {i: (lambda e=e: _sample(bundle, e["transformer"], time_labels, steps, cfg, seed, scheduler, reset=True))
         for i, e in enumerate(entries) if timed_as[i] == i}, repeats, order="shuffle", seed=seed,
        after_round=after_round)
    ref_t = statistics.median(times[0])
    for i, row in enumerate(rows):
        t = times[timed_as[i]]
        med = statistics.median(t)
        if timed_as[i] != i:
            row["timed_with"] = rows[timed_as[i]]["family"] + ", " + rows[timed_as[i]]["label"]
        row.update(seconds=med, speedup=ref_t / med, seconds_all=t,
                   ideal_speedup=1.0 / max(1e-9, 1.0 - row["flops_removed"]))
    return rows


# ---------------------------------------------------------------------------------------------- summary
def summarize(rows, targets=TARGETS, tol: float = TOLERANCE, flops_targets=FLOPS_TARGETS,
              full_accuracy: float | None = None, margin_db: float = 0.0, accuracy_points: float = 2.0) -> dict:
    """For every target speedup (and FLOPs-removed fraction): the best PSNR each family reaches there,
    the learned schedule's margin over the best baseline and the best peer, and whether it wins (by more
    than ``margin_db``; the goal also wants its accuracy within ``accuracy_points`` of full compute at 1.5x)."""
    fams = list(dict.fromkeys(r["family"] for r in rows if r["family"] != "full compute"))
    kinds = {r["family"]: r.get("kind") for r in reversed(rows)}  # the first row's kind
    group = {f: GROUPS.get(f, "peer" if kinds[f] == "peer" else "other") for f in fams}
    out = dict(tolerance=tol, margin_goal_db=margin_db, accuracy_goal_points=accuracy_points, by_speedup=[],
               by_flops=[])
    for key, tgts, dest in (("speedup", targets, "by_speedup"), ("flops_removed", flops_targets, "by_flops")):
        for t in tgts:
            per, images, top = {}, {}, {}  # top[group]: (PSNR, family) of the group's best family at t
            least = (1 - (tol if key == "speedup" else 0.0)) * t   # what a row must reach to count at t
            for f in fams:
                reach = [r for r in rows if r["family"] == f and r.get(key) is not None and r[key] >= least]
                b = max(reach, key=lambda r: r["psnr"]) if reach else None
                if b is None:
                    per[f] = dict(unreachable=True, max_reached=max((r.get(key) or 0.0) for r in rows
                                                                    if r["family"] == f))
                    continue
                per[f] = {k: b[k] for k in ("label", "speedup", "psnr", "ssim", "accuracy", "flops_removed")}
                images[f] = b.get("psnr_per_image")
                top[group[f]] = max(top.get(group[f], (b["psnr"], f)), (b["psnr"], f))
            bl, bb, bp, ba, bs = (top.get(g) for g in ("learned", "baseline", "peer", "ablation", "searcher"))

            def named(x):
                return None if x is None else dict(family=x[1], **per[x[1]])

            def lead(x):  # learned minus x (dB)
                return None if (bl is None or x is None) else bl[0] - x[0]
            others = [x for x in (bb, bp) if x is not None]
            margin = lead(max(others)) if others else None
            # wins: above every baseline and peer (by margin_db where set), and no lower than the static searchers
            wins = (bl is not None and all(bl[0] > o[0] for o in others)
                    and (margin_db <= 0 or margin is None or margin >= margin_db - 1e-9)
                    and (bs is None or bl[0] >= bs[0]))
            entry = dict(target=t, per_family=per, ablation=named(ba), margin_over_ablation_db=lead(ba),
                         learned=named(bl), best_baseline=named(bb), best_peer=named(bp), best_searcher=named(bs),
                         margin_over_searcher_db=lead(bs), learned_wins=wins, margin_db=margin)
            if bl is not None and others:   # the paired per-image difference to the best other row, with its noise
                pm = paired_margin(images[bl[1]], images[max(others)[1]])
                if pm is not None:
                    entry["paired_margin_db"], entry["paired_margin_se_db"] = round(pm[0], 3), round(pm[1], 3)
            if key == "speedup" and full_accuracy is not None and bl is not None and per[bl[1]]["accuracy"] is not None:
                entry["accuracy_drop_points"] = 100 * (full_accuracy - per[bl[1]]["accuracy"])
            out[dest].append(entry)
    out["goal_met"] = all(e["learned_wins"] for e in out["by_speedup"])
    acc15 = [e for e in out["by_speedup"] if abs(e["target"] - 1.5) < 1e-9]
    if acc15 and acc15[0].get("accuracy_drop_points") is not None:
        ok = acc15[0]["accuracy_drop_points"] <= accuracy_points + 1e-9
        out["accuracy_within_goal_at_1_5x"] = ok
        out["goal_met"] = out["goal_met"] and ok
    return out


def _fmt(v, f="{:.2f}"):
    return "—" if v is None else "inf" if isinstance(v, float) and math.isinf(v) else f.format(v)


def _notes(m: dict) -> str:
    """The header's sentences on the machine's load and on budgets placed at speed targets (where recorded)."""
    la, sp, out = m.get("load_average"), m.get("speed_targets"), ""
    vals = [v for v in la.get("start_and_per_timed_round", []) + [la.get("end")] if v is not None] if la else []
    if vals:
        busy = max(vals) > (m.get("threads") or 1) + 0.5   # more runnable work than this run's own threads
        out += (f" Load average (1 min) during the run: {min(vals):.1f}-{max(vals):.1f} on {m.get('cpu_count')} cores "
                + ("(other work shared the machine: speedups are ratios of interleaved runs, absolute times are not "
                   "this model's speed)." if busy else f"(about this run's own {m.get('threads') or 1} thread(s)); "
                   "one run's time still moves 5-10% from run to run on this machine."))
    if sp:
        out += (f" Budgets placed at the speed targets {', '.join(f'{t:g}x' for t in sp['speedups'])} before learning, "
                f"from step costs timed on this machine{' on ' + sp['placed'] if sp.get('placed') else ''} (the run "
                f"that learned the schedules) over a plain step (reused / computed under a schedule: "
                + ", ".join(f"{k} {v['reused']:.3f} / {v['computed']:.3f}" for k, v in sp["costs"].items())
                + f"; the pooled ones used): budgets {', '.join(f'{b:.2f}' for b in m['budgets'])} (the learner "
                "and the static searchers both).")
        c = sp.get("check") or {}
        out += (f" Checked after learning ({c['rounds']} rounds): the front placed at {c['first_budgets']} ran "
                f"{c['measured']}x (again: {c.get('measured_again')}), refit computed step {c['refit']['computed']:.3f}"
                "; targets off by a step learned again." if c else "")
    return out


def _shared_timings(rows: list) -> str:
    """The sentence on rows that ran a schedule another row also found, timed once for both."""
    n = sum("timed_with" in r for r in rows)
    return (f" {n} rows run the same work as an earlier row (as many steps computing the same units, the same "
            f"forecast) and share its timing." if n else "")


def _paired(e: dict) -> str:
    """The paired margin cell: mean per-image difference ± two standard errors, and "tie" inside them."""
    if e.get("paired_margin_db") is None:
        return "—"
    m, se = e["paired_margin_db"], e["paired_margin_se_db"]
    return f"{m:+.2f} ± {2 * se:.2f}" + (" (tie)" if abs(m) <= 2 * se else "")


def _title(m: dict) -> str:
    sampler = m.get("scheduler", "ddim")
    return f"{m['model']}, {SAMPLER_TITLES.get(sampler, sampler)} {m['steps']} steps, CFG {m['cfg']}"


def markdown(result: dict) -> str:
    m, rows, s = result["meta"], result["rows"], result["summary"]
    full = rows[0]
    shuffled = " (methods in a new random order each round)" if m.get("round_order") == "shuffled" else ""
    lines = [f"# Learned schedules vs baselines and peers: {_title(m)}", "",
             f"{harness.describe(m)}. Quality: PSNR/SSIM on {m['samples']} digits (labels i mod 10, noise seed "
             f"{m['seed']}) against full compute from the same noise; classifier accuracy on {m['accuracy_samples']} "
             f"digits (seed {m['seed'] + 1}) for full compute ({_fmt(full['accuracy'], '{:.3f}')}), the learned "
             f"schedules and the best baseline and peer at each target, on the {m['samples']} for the others. Speed: "
             f"median of {m['repeats']} interleaved runs of {m['time_samples']} digits after a warm-up round"
             f"{shuffled}; full compute {full['seconds']:.2f} s per run = 1.00x." + _shared_timings(rows) + _notes(m),
             "",
             "## At " + ", ".join(f"{t:g}x" for t in TARGETS) + " measured speedup", "",
             f"Best PSNR each family reaches at a speedup of at least {100 * (1 - m['tolerance']):.0f}% of the target "
             "(\"cannot reach\": no setting of that method is that fast).", ""]
    best = []
    for e in s["by_speedup"]:
        for fam, v in e["per_family"].items():
            if v.get("unreachable"):
                best.append([f"{e['target']:.1f}x", fam, f"cannot reach (fastest: {v['max_reached']:.2f}x)"] + [""] * 5)
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
    return speed_quality(pts, path, title=f"{_title(result['meta'])}: speed vs PSNR against full compute (CPU)",
                         highlight=LEARNED, targets=TARGETS)


# ---------------------------------------------------------------------------------------------- main
def magcache_ratios(bundle, steps: int, cfg: float, scheduler: str) -> list[float]:
    """MagCache's magnitude ratios for this model, sampler, step count and guidance, calibrated (as diffusers
    documents) on one full-compute generation of digits 0-9 from noise seed ``MAGCACHE_SEED``, not the
    evaluation's noise."""
    return peer_mod.calibrate_magcache(bundle.transformer, steps, lambda t: _sample(
        bundle, t, list(range(10)), steps, cfg, MAGCACHE_SEED, scheduler))


def peer_settings_for(bundle, steps: int, cfg: float, scheduler: str, log=print) -> list:
    """The peers' default grid, with MagCache (Flux-like block lists only) calibrated on this model."""
    tr, mag_ratios = bundle.transformer, None
    if l2c.adapters.adapter_for(tr).branches(tr) == ["block"]:
        log(f"calibrating MagCache's magnitude ratios (10 digits, noise seed {MAGCACHE_SEED}) ...")
        mag_ratios = magcache_ratios(bundle, steps, cfg, scheduler)
    return peer_mod.default_settings(tr, steps, mag_ratios=mag_ratios)


def build_entries(bundle, steps: int, cfg: float, budgets, *, out_dir: Path | None, relearn: bool, scheduler: str,
                  learn_kwargs: dict, curve_runs: int, peer_settings=None, log=print):
    tr = bundle.transformer
    entries = [dict(family="full compute", label="diffusers transformer", kind="full", transformer=tr)]
    full_sched = _block_weighted(schedules.full(tr, models.timesteps_for(bundle, steps, scheduler)), tr)
    entries.append(dict(family="full compute (compiled)", label="compile_schedule, nothing reused", kind="schedule",
                        schedule=full_sched, transformer=l2c.compile_schedule(tr, full_sched)))
    log("learning schedules ...")
    methods = learned_schedules(bundle, steps, budgets, cfg, out_dir, relearn, scheduler, log=log, **learn_kwargs)
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
    for fam, label, s in methods + baseline_schedules(bundle, steps, budgets, curves, scheduler):
        params = {k: v for k, v in s.params.items() if k not in ("scores", "history")}
        entries.append(dict(family=fam, label=label, kind="schedule", schedule=s, params=params,
                            transformer=l2c.compile_schedule(tr, s)))
    if peer_settings is None:
        peer_settings = peer_settings_for(bundle, steps, cfg, scheduler, log)
    for st in peer_settings:
        fam = peer_mod.FAMILY_NAMES[st.family]
        try:
            entries.append(dict(family=fam, label=st.label, kind="peer", params=st.params,
                                transformer=peer_mod.make_peer(tr, st, steps)))
        except peer_mod.PeerUnavailable as e:
            unavailable.append(dict(family=fam, setting=st.label, reason=str(e)))
            log(f"  {st.label}: cannot be applied: {e}")
    return entries, unavailable


def result_tag(model: str, steps: int, suffix: str = "") -> str:
    """File stem of one comparison's results under ``--out`` (``<tag>.json/.md/.png``, ``<tag>_schedules/``);
    ``suffix`` ``"speed"`` for fronts learned at speed targets."""
    return f"pareto_{model}_{steps}" + (f"_{suffix}" if suffix else "")


def speed_budgets(bundle, a, learn_kwargs: dict) -> tuple:
    """``(budgets, speed)`` for ``a.speedups``, timed as the table times a method: step costs place the budgets; with
    ``a.speed_check`` the front is then learned, timed, and the targets it missed by a step learned again
    (``l2c_kernels.learn.speed.check_front``, as ``learn_front(speedups=)`` checks at the learner's own batch)."""
    from l2c_kernels.sampling.conditioning import denoiser_for
    from l2c_kernels.learn.speed import budgets_for_speedups, check_front, measure_step_costs

    cfg, sch, steps, log = guidance_scale(bundle, a.cfg), default_sampler(bundle), a.steps, harness.log
    den = denoiser_for(bundle, a.time_samples, cfg, _learn_scheduler(sch), seed=0,
                       labels=(labels := [i % 10 for i in range(a.time_samples)]))
    sample = lambda m: _sample(bundle, m, labels, steps, cfg, 0, sch)  # noqa: E731  (one generation, as timed)
    costs = measure_step_costs(den, steps, sample=sample)
    budgets, targets = [], []
    for t in sorted(a.speedups):
        try:
            budgets.append(round(budgets_for_speedups([t], costs["pooled"], steps)[0], 4))
            targets.append(t)
        except ValueError as e:
            log(f"  {e}: left out")
    speed = dict(costs={k: c.to_dict() for k, c in costs.items()}, speedups=targets, asked=sorted(a.speedups))
    log(f"step costs over a plain step {speed['costs']}; speed targets {targets} -> budgets {budgets}")
    if not a.speed_check:
        return budgets, speed
    folder = Path(a.out) / f"{result_tag(bundle.name, steps, 'speed')}_schedules"

    def learn(bs):
        return [s for f, _, s in learned_schedules(bundle, steps, bs, cfg, folder, True, sch, log=log, **learn_kwargs)
                if f == LEARNED]
    chk = check_front(learn(budgets), budgets, targets, costs["pooled"], den, steps, a.speed_check, sample=sample)
    moved = [round(chk["budgets"][k], 4) if k in chk["redo"] else b for k, b in enumerate(budgets)]
    r3 = lambda xs: xs and [round(x, 3) for x in xs]  # noqa: E731
    speed["check"] = dict(rounds=a.speed_check, measured=r3(chk["measured"]), measured_again=r3(chk["measured_again"]),
                          refit=chk["refit"].to_dict(), first_budgets=budgets, budgets=moved)
    log(f"speed check: {speed['check']}")
    if chk["redo"]:   # a front of its own (its searchers on its own segment costs), saved beside the first
        learn([moved[k] for k in chk["redo"]])
    return moved, speed


def guidance_scale(bundle, cfg: float | None) -> float:
    """``cfg``, or the bundled model's recommended guidance scale when None."""
    return bundle.recommended_cfg if cfg is None else float(cfg)


def _verdict_rows(summary: dict, keys) -> set:
    """``(family, label)`` of the rows a summary names under ``keys`` at some target speedup."""
    return {(e[k]["family"], e[k]["label"]) for e in summary["by_speedup"] for k in keys if e.get(k)}


def run(bundle, steps: int, *, cfg: float | None = None, budgets=(0.3, 0.4, 0.5, 0.6), samples: int = 20,
        accuracy_samples: int = 100, time_samples: int = 10, repeats: int = 3, seed: int = 100,
        out: Path | None = None, relearn: bool = False, scheduler: str | None = None, learn_kwargs: dict | None = None,
        curve_runs: int = 2, peer_settings=None, speed: dict | None = None, log=print) -> dict:
    """The whole comparison for one bundled model and step count; writes the result files when ``out`` is set
    (``scheduler`` None: DDIM, or Euler flow matching for flux-digits)."""
    cfg = guidance_scale(bundle, cfg)
    scheduler = scheduler or default_sampler(bundle)
    tag = result_tag(bundle.name, steps, "speed" if speed else "")
    t0 = time.time()
    sched_dir = None if out is None else Path(out) / f"{tag}_schedules"
    entries, unavailable = build_entries(bundle, steps, cfg, budgets, out_dir=sched_dir, relearn=relearn,
                                         scheduler=scheduler, learn_kwargs=dict(learn_kwargs or {}),
                                         curve_runs=curve_runs, peer_settings=peer_settings, log=log)
    log(f"running {len(entries)} methods: quality on {samples} digits, {repeats} timed rounds on {time_samples}")
    loads = [load_average()]
    rows = run_methods(bundle, entries, steps=steps, cfg=cfg, labels=[i % 10 for i in range(samples)],
                       time_labels=[i % 10 for i in range(time_samples)], repeats=repeats, seed=seed,
                       scheduler=scheduler, log=log, loads=loads)
    for r in rows:
        r["accuracy_samples"] = samples if r["accuracy"] is not None else 0
    if accuracy_samples > samples and rows[0]["accuracy"] is not None:
        # accuracy needs more digits than PSNR: measure it again on many for full compute, the learned
        # schedules and the best baseline/peer rows at each target
        best = _verdict_rows(summarize(rows), ("best_baseline", "best_peer"))
        picked = [i for i, r in enumerate(rows)
                  if i == 0 or r["family"] == LEARNED or (r["family"], r["label"]) in best]
        acc_labels = [i % 10 for i in range(accuracy_samples)]
        log(f"classifier accuracy on {accuracy_samples} digits for {len(picked)} methods")
        for i in picked:
            imgs = _sample(bundle, entries[i]["transformer"], acc_labels, steps, cfg, seed + 1, scheduler, reset=True)
            rows[i]["accuracy_small"] = rows[i]["accuracy"]
            rows[i]["accuracy"] = classifier.class_accuracy(imgs, acc_labels)
            rows[i]["accuracy_samples"] = accuracy_samples
    meta = harness.meta(benchmark="learned schedules vs baselines and peers", model=bundle.name, steps=steps,
                        scheduler=scheduler, cfg=cfg, samples=samples, accuracy_samples=accuracy_samples,
                        time_samples=time_samples, repeats=repeats, round_order="shuffled", seed=seed,
                        budgets=list(budgets), tolerance=TOLERANCE, cpu_count=os.cpu_count(),
                        load_average=dict(start_and_per_timed_round=loads, end=load_average()),
                        magcache_calibration_seed=MAGCACHE_SEED, wall_seconds=round(time.time() - t0, 1))
    if speed:
        meta["speed_targets"] = speed
    result = dict(meta=meta, rows=rows, unavailable=unavailable,
                  summary=summarize(rows, full_accuracy=rows[0]["accuracy"], **GOALS.get(bundle.name, DEFAULT_GOAL)))
    if out is not None:
        harness.write_result(out, tag, result, markdown(result))
        plot(result, Path(out) / f"{tag}.png")
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
    for flag, default, what in (
            ("--samples", 20, "digits for PSNR/SSIM (and accuracy of every method)"),
            ("--accuracy-samples", 100,
             "digits for the accuracy of full compute, the learned schedules and the best other methods"),
            ("--time-samples", 10, "digits per timed run"),
            ("--repeats", 3, "interleaved timed rounds (after one warm-up round)"),
            ("--seed", 100, "noise seed of the evaluation (learning uses others)"),
            ("--iterations", None, "router iterations (default: learn_schedule's)"),
            ("--refine", 0, "calibration measurements of the learner's local search after its pick (0: none)"),
            ("--batch-size", None, "router training batch (default: learn_schedule's)"),
            ("--calibration-samples", None,
             "samples the learner measures its candidate schedules on (default: learn_schedule's)"),
            ("--curve-runs", 2, "full-compute runs (4 digits each) the Block Caching change curves are averaged over")):
        ap.add_argument(flag, type=int, default=default, help=what)
    ap.add_argument("--warm-up", type=_warm_up_arg, default=None, metavar="N|auto",
                    help="first steps the learned schedules compute in full (default: learn_schedule's, auto)")
    ap.add_argument("--speed-check", type=int, default=0, metavar="ROUNDS",
                    help="with --speedups and new budgets: time the learned front as the table does (ROUNDS rounds) "
                         "and learn again each target the timings move by a computed step or more; 0: off")
    ap.add_argument("--relearn", action="store_true",
                    help="learn again even if saved schedules exist (with --speedups: time the step costs and place "
                         "the budgets again too, rather than take the saved table's)")
    a = harness.parse(ap, argv)
    bundle = models.load(a.model)
    learn_kwargs = {k: v for k, v in (("iterations", a.iterations), ("calibration_samples", a.calibration_samples),
                                      ("batch_size", a.batch_size), ("refine_evaluations", a.refine or None),
                                      ("warm_up", a.warm_up)) if v is not None}
    speed = None
    if a.speedups:
        saved = Path(a.out) / f"{result_tag(a.model, a.steps, 'speed')}.json"
        old = json.loads(saved.read_text())["meta"] if saved.exists() and not a.relearn else {}
        sp = old.get("speed_targets", {})
        if sp.get("asked", sp.get("speedups")) == sorted(a.speedups) and old.get("steps") == a.steps:
            # the saved table's budgets and step costs: its learned schedules are reused (re-timed, not re-learned)
            a.budgets, speed = old["budgets"], dict(sp, placed=sp.get("placed", old.get("date")))
            harness.log(f"speed targets {speed['speedups']} -> budgets {a.budgets} (from {saved.name})")
        else:
            a.budgets, speed = speed_budgets(bundle, a, learn_kwargs)
            a.relearn = a.relearn and not a.speed_check   # the check learned and saved the front the table reads
    res = run(bundle, a.steps, cfg=a.cfg, budgets=a.budgets, samples=a.samples, accuracy_samples=a.accuracy_samples,
              time_samples=a.time_samples, repeats=a.repeats, seed=a.seed, out=Path(a.out), relearn=a.relearn,
              learn_kwargs=learn_kwargs, curve_runs=a.curve_runs, speed=speed, log=harness.log)
    print(markdown(res).split("## Every method")[0])
    return res


if __name__ == "__main__":
    main()
