"""First-generation and steady-state time per generation under torch.compile, and per-step host overhead.

For each bundled model (CFG batch of ``2 * len(labels)``): the original transformer eager and under
``torch.compile``; ``compile_schedule`` eager and with ``torch_compile=True`` at 0%, 50% (FORA 2) and a learned
schedule; cache-dit DBCache under ``torch.compile``. "first": each runner's first generation (compilation included,
inductor's disk caches off); "steady": the median of ``--steady`` interleaved rounds. Host overhead: a 2-block DiT
where a call is almost all host work. Notes: bench/NOTES.md ("Serving runtime").

    nice -n 10 python bench/bench_compile.py                       # writes compile_cpu.{json,md}
    nice -n 10 python bench/bench_compile.py --models dit-digits --steps 20 --steady 1   # quicker
"""
from __future__ import annotations

import os

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import harness  # noqa: E402
import torch  # noqa: E402

import l2c_kernels as l2c  # noqa: E402
from l2c_kernels import models, schedules  # noqa: E402

log = harness.log


def _generation(bundle, tr, steps: int, labels, cfg: float, reset=None) -> float:
    if reset is not None:
        reset()
    t0 = time.perf_counter()
    models.sample(bundle, labels=labels, steps=steps, cfg=cfg, seed=0, transformer=tr, progress=False)
    return time.perf_counter() - t0


def model_rows(name: str, steps: int, labels, steady: int, learned_path: Path | None, dbcache: bool = True,
               cpp_wrapper_original: bool = False) -> list[dict]:
    """First generations one after another (each compiled runner in its own dynamo cache), then ``steady``
    rounds in which every runner samples once, in a new random order each round (a slow stretch of a shared
    machine then hits different runners); steady = the median of a runner's rounds."""
    from torch._dynamo.utils import counters

    bundle = models.load(name)
    tr, cfg = bundle.transformer, bundle.recommended_cfg
    ts = models.timesteps_for(bundle, steps)  # DDIM, or Euler flow matching for flux-digits
    scheds = {"0%": schedules.full(tr, ts), "50% (FORA 2)": schedules.uniform(tr, ts, 2)}
    if learned_path is not None and learned_path.exists():
        learned = l2c.Schedule.load(learned_path)
        if len(learned.timesteps) == steps:
            scheds[f"learned {100 * learned.flops_removed_fraction():.0f}% ({learned.forecast} forecast)"] = learned
    log(f"{name}: {'Euler flow matching' if bundle.is_flow_matching else 'DDIM'} {steps}, batch {2 * len(labels)} "
        f"(CFG), {torch.get_num_threads()} thread(s)")
    runners = []  # (row, transformer, reset)

    def first(row, runner, reset=None, counts=False):
        if counts:
            counters.clear()
        row.update(model=name, first_s=round(_generation(bundle, runner, steps, labels, cfg, reset), 3))
        if counts:
            row.update(graphs=int(counters["stats"]["unique_graphs"]),
                       graph_breaks=sum(counters["graph_break"].values()))
        if hasattr(runner, "compiled_variants") and row["compiled"]:
            row["compiled_variants"] = runner.compiled_variants()
        log(f"  {row['label']}: first {row['first_s']:.1f} s" + (f", graphs {row.get('graphs')}, breaks "
                                                                  f"{row.get('graph_breaks')}" if counts else ""))
        runners.append((row, runner, reset))

    torch._dynamo.reset()
    first(dict(label="original, eager", kind="original", compiled=False), tr)
    first(dict(label="original, torch.compile", kind="original", compiled=True), torch.compile(tr), counts=True)
    if cpp_wrapper_original:  # the option our compiled blocks use on CPU, given to the original as well
        first(dict(label="original, torch.compile (C++ wrapper)", kind="original", compiled=True),
              torch.compile(tr, options={"cpp_wrapper": True}), counts=True)
    for compiled in (False, True):  # every schedule eager, then every one compiled
        for tag, s in scheds.items():
            fast = l2c.compile_schedule(tr, s, cuda_graphs=False, **dict(torch_compile=True) if compiled else {})
            first(dict(label=f"cached {tag}, {'torch.compile' if compiled else 'eager'}", kind="cached",
                       compiled=compiled, flops_removed=round(s.flops_removed_fraction(), 3),
                       distinct_plans=fast.distinct_plans()), fast, counts=compiled)

    def after_round(k, times):
        log(f"  steady round {k + 1}/{steady}: " + ", ".join(f"{r['label']} {times[i][-1]:.1f} s"
                                                          for i, (r, _, _) in enumerate(runners)))
    times = harness.interleave({i: (lambda r=r, reset=reset: _generation(bundle, r, steps, labels, cfg, reset))
                                for i, (_, r, reset) in enumerate(runners)}, steady,
                               warmup=0, order="shuffle", after_round=after_round)
    rows = [row for row, _, _ in runners]
    for i, row in enumerate(rows):
        row.update(steady_s=round(statistics.median(times[i]), 3), steady_runs=[round(t, 3) for t in times[i]])
    if not dbcache:
        return rows
    try:  # last: cache-dit's hooks patch the model's forward; its compiled code must not mix with the rows above
        from peers import PeerSetting, make_peer

        torch._dynamo.reset()
        setting = PeerSetting("dbcache", dict(Fn=2, Bn=0, threshold=0.2, warmup=max(1, steps // 10)))
        peer = make_peer(tr, setting, steps)
        peer.inner.compile()
        row = dict(label=f"cache-dit {setting.label}, torch.compile", kind="dbcache", compiled=True)
        runners.clear()
        first(row, peer, reset=peer.reset, counts=True)
        runs = [_generation(bundle, peer, steps, labels, cfg, peer.reset) for _ in range(steady)]
        row.update(steady_s=round(statistics.median(runs), 3), steady_runs=[round(t, 3) for t in runs],
                   flops_removed=round(peer.flops_removed_fraction(), 3), steady_note="timed after the other rows")
        rows.append(row)
    except Exception as e:  # noqa: BLE001 - recorded in the results
        rows.append(dict(model=name, label="cache-dit DBCache, torch.compile", kind="dbcache",
                         error=f"{type(e).__name__}: {e}"))
        log(f"  DBCache failed: {e}")
    for r in rows:
        log(f"  {r['label']}: first {r.get('first_s')} s, steady {r.get('steady_s')} s")
    return rows


def host_overhead(calls: int = 300) -> dict:
    """Median time per call of a 2-block DiT (16 tokens, batch 1): original vs cached module (eager)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2,
                              sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval().requires_grad_(False)
    ts = list(range(999, 0, -20))[:50]
    x, lab, tts = torch.randn(1, 4, 8, 8), torch.tensor([3]), [torch.tensor([t]) for t in ts]
    runners = {"original": m,
               "cached, full schedule": l2c.compile_schedule(m, l2c.Schedule.full(m, ts), cuda_graphs=False),
               "cached, 50% (FORA 2)": l2c.compile_schedule(m, schedules.uniform(m, ts, 2), cuda_graphs=False),
               "cached, full schedule, timestep_check='off'": l2c.compile_schedule(
                   m, l2c.Schedule.full(m, ts), cuda_graphs=False, timestep_check="off")}
    with torch.no_grad():
        per = harness.interleave({k: (lambda r=r: [r(x, timestep=t, class_labels=lab) for t in tts])
                                  for k, r in runners.items()}, calls // len(ts), warmup=2)
    out = {k: round(1e6 * statistics.median(v) / len(ts), 1) for k, v in per.items()}
    return dict(model="DiTTransformer2DModel, 2 blocks, hidden 16, 16 tokens, batch 1", us_per_call=out,
                ratio_to_original={k: round(v / out["original"], 3) for k, v in out.items()})


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"# torch.compile and host overhead, CPU ({m['date']})", "",
             f"{harness.describe(m)}; {m['steps']} steps (DDIM; Euler flow matching for flux-digits), CFG batch "
             f"{m['batch']}, fp32; load average at the end of each model's rows: {m.get('load_average', '')}. First = "
             "first generation in a fresh dynamo state (compilation included, inductor disk caches off); steady = "
             f"median of {m['steady']} interleaved rounds (random order per round). {m['note']}", ""]
    for name in m["models"]:
        rows = [r for r in res["rows"] if r["model"] == name]
        ref = next((r for r in rows if r["label"] == "original, torch.compile" and "first_s" in r), None)
        cells = [[r["label"], f"failed: {r['error']}"] + [""] * 6 if "error" in r else [
            r["label"], f"{r['first_s']:.1f}", f"{r['steady_s']:.2f}",
            f"{ref['steady_s'] / r['steady_s']:.2f}x" if ref else "",
            f"{r['first_s'] / ref['first_s']:.2f}x" if ref else "",
            f"{r.get('flops_removed', 0):.0%}", r.get("graphs", ""), r.get("graph_breaks", "")] for r in rows]
        lines += [f"## {name}", ""] + harness.table(
            ["run", "first gen (s)", "steady gen (s)", "steady vs compiled original", "first vs compiled original",
             "FLOPs removed", "graphs", "graph breaks"], cells) + [""]
    h = res.get("host_overhead")
    if h:
        lines += ["## Per-step host overhead", "", h["model"] + " (a call is almost all host work):", ""]
        lines += harness.table(["module", "us per call", "vs original"], [
            [k, v, f"{h['ratio_to_original'][k]:.2f}x"] for k, v in h["us_per_call"].items()]) + [""]
    return "\n".join(lines)


def main(argv=None):
    p = harness.parser(__doc__, threads=1, out=harness.RESULTS / "compile_cpu")
    p.add_argument("--models", nargs="+", default=["dit-digits", "pixart-digits", "flux-digits"])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--labels", type=int, nargs="+", default=[3, 7])
    p.add_argument("--steady", type=int, default=2)
    p.add_argument("--skip-host", action="store_true")
    p.add_argument("--no-dbcache", action="store_true",
                   help="leave out the cache-dit row (its compilation is the slowest)")
    p.add_argument("--cpp-wrapper-original", action="store_true", help="add a row: the original under torch.compile "
                   "with inductor's C++ wrapper (which compile_schedule's compiled blocks use on CPU)")
    p.add_argument("--note", default="")
    a = harness.parse(p, argv)  # --out: the result files' path without suffix
    res = dict(meta=harness.meta(steps=a.steps, batch=2 * len(a.labels), steady=a.steady, models=a.models,
                                 note=a.note), rows=[])

    if not a.skip_host:
        res["host_overhead"] = host_overhead()
        log(res["host_overhead"])
    for name in a.models:
        learned = harness.RESULTS / f"pareto_{name}_{a.steps}_schedules" / "learned_50.l2c.json"
        res["rows"] += model_rows(name, a.steps, a.labels, a.steady, learned, dbcache=not a.no_dbcache,
                                  cpp_wrapper_original=a.cpp_wrapper_original)
        res["meta"].setdefault("load_average", {})[name] = " ".join(f"{v:.1f}" for v in harness.load_average() or [])
    harness.write_result(Path(a.out).parent, Path(a.out).name, res, markdown(res))   # once, whole
    log(markdown(res))


if __name__ == "__main__":
    main()
