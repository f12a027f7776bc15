"""Peak memory of learning a schedule, whole-trajectory graph ("trajectory") against step-wise training
("stepwise"), and a memory model extrapolated to DiT-XL/2 and PixArt-Sigma.

Each measurement is a fresh process (peak RSS) running one soft router iteration (``train_router(..., budget=0.5,
iterations=1, batch_size=4, hard_fraction=0, training=mode)``, CFG on: model batch 8); ``base`` is its RSS after
loading the model. The memory model (``alpha``: float32 values one block keeps for backward per residual element)
and the extrapolation's assumptions: bench/NOTES.md ("Learning memory: step-wise training").

    nice -n 10 python bench/bench_learn_memory.py          # writes learn_memory.{json,md}
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import harness

THREADS = 1   #: torch threads of every measuring process (and of the parent, whose meta the result records)
SIZES = {  # name: (blocks, width, heads, latent side, patch)
    "dit-digits": (12, 128, 4, 16, 2),
    "dit-half": (6, 64, 2, 16, 2),   # same tokens, half the depth and width, random weights
}
TARGETS = {  # extrapolation targets: blocks, width, tokens, model batch (CFG), steps, branches, params
    "DiT-XL/2 256px, 50 steps, batch 4 + CFG": dict(blocks=28, width=1152, tokens=256, batch=8, steps=50,
                                                    branches=2, params=675e6),
    "PixArt-Sigma 1024px, 20 steps, batch 2 + CFG": dict(blocks=28, width=1152, tokens=4096, batch=4, steps=20,
                                                         branches=3, params=611e6),
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(model: str, steps: int, mode: str) -> dict:
    import time


    from l2c_kernels.models import BundledModel, load
    from l2c_kernels.models.configs import NOISE_SCHEDULE

    if model == "dit-digits":
        bundle = load("dit-digits")
    else:
        from diffusers import DiTTransformer2DModel

        nb, width, heads, side, patch = SIZES[model]
        tr = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=width // heads, in_channels=1,
                                   out_channels=1, num_layers=nb, sample_size=side, patch_size=patch,
                                   num_embeds_ada_norm=1000).eval().requires_grad_(False)
        bundle = BundledModel(model, tr, None, dict(NOISE_SCHEDULE), info=dict(recommended_cfg=1.5))
    import gc

    gc.collect()
    base = _rss_mb()
    t0 = time.time()
    from l2c_kernels.learn import train_router

    train_router(bundle, steps, budget=0.5, iterations=1, batch_size=4, cfg=1.5, progress=False, hard_fraction=0.0,
                 calibration_samples=0, training=mode)
    return dict(model=model, steps=steps, mode=mode, base_mb=round(base, 1), peak_mb=round(_rss_mb(), 1),
                seconds=round(time.time() - t0, 1))


def measure(model, steps, mode) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", model, str(steps), mode], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def fit_line(xs, ys):
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def model_fit(rows) -> dict:
    """alpha per model size from the trajectory runs' slope (MB per step)."""
    fits = {}
    for model, (nb, width, heads, side, patch) in SIZES.items():
        tr = [r for r in rows if r["model"] == model and r["mode"] == "trajectory"]
        if not tr:
            continue
        if len(tr) >= 2:
            _, slope_mb = fit_line([r["steps"] for r in tr], [r["peak_mb"] for r in tr])
        else:   # one run: its growth over the process's base, per step
            slope_mb = (tr[0]["peak_mb"] - tr[0]["base_mb"]) / tr[0]["steps"]
        elems = 8 * (side // patch) ** 2 * width   # model batch 8 (batch 4 + CFG) x tokens x width
        per_block = slope_mb * 2 ** 20 / nb
        fits[model] = dict(mb_per_step=round(slope_mb, 2), bytes_per_block_per_step=round(per_block),
                           alpha=round(per_block / (4 * elems), 2))
    return fits


def extrapolate(alpha: float) -> dict:
    out = {}
    for name, t in TARGETS.items():
        elems = t["batch"] * t["tokens"] * t["width"]
        step_graph = t["blocks"] * alpha * elems * 2
        caches = t["blocks"] * t["branches"] * elems * 2 * 3
        weights = t["params"] * 2
        gb = 2 ** 30
        out[name] = dict(trajectory_gb=round((weights + t["steps"] * step_graph + caches) / gb, 1),
                         stepwise_gb=round((weights + step_graph + caches) / gb, 1),
                         one_step_graph_gb=round(step_graph / gb, 1), carried_caches_gb=round(caches / gb, 1),
                         weights_gb=round(weights / gb, 1))
    return out


def main(argv=None):
    ap = harness.parser(__doc__, threads=None)
    ap.add_argument("--worker", nargs=3, metavar=("MODEL", "STEPS", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50], help="dit-digits' step counts")
    ap.add_argument("--small-steps", type=int, nargs="+", default=[10, 20], help="dit-half's step counts")
    a = harness.parse(ap, argv)
    import torch

    torch.set_num_threads(THREADS)
    if a.worker:
        print(json.dumps(worker(a.worker[0], int(a.worker[1]), a.worker[2])))
        return
    plan = [("dit-digits", s, m) for m in ("trajectory", "stepwise") for s in a.steps]
    plan += [("dit-half", s, m) for m in ("trajectory", "stepwise") for s in a.small_steps]
    rows = []
    for k, p in enumerate(plan):
        rows.append(measure(*p))
        harness.log(f"{k + 1}/{len(plan)} {rows[-1]}")
    fits = model_fit(rows)
    alpha = max(f["alpha"] for f in fits.values())
    checks = []   # the fit's prediction of every measured trajectory peak (base of the same process + graph)
    for r in (r for r in rows if r["mode"] == "trajectory"):
        nb, width, heads, side, patch = SIZES[r["model"]]
        graph_mb = nb * alpha * 4 * 8 * (side // patch) ** 2 * width * r["steps"] / 2 ** 20
        checks.append(dict(model=r["model"], steps=r["steps"], measured_growth_mb=round(r["peak_mb"] - r["base_mb"]),
                           predicted_graph_mb=round(graph_mb)))
    res = dict(device=f"cpu (every measurement its own process, one at a time, {THREADS} thread(s))",
               dtype="float32 (measured); bf16 (extrapolated)",
               setting="train_router(budget=0.5, iterations=1, batch_size=4, cfg=1.5, hard_fraction=0, "
                       "forecast='auto' (linear soft caches))", rows=rows, fits=fits, alpha_used=alpha,
               fit_checks=checks, extrapolation=extrapolate(alpha), meta=harness.meta())
    harness.write_result(a.out, "learn_memory", res, markdown(res))
    print(markdown(res))


def markdown(res) -> str:
    rows = res["rows"]
    lines = [f"# Peak memory of learning a schedule ({res.get('date') or res['meta']['date']})", "",
             f"{res['device']}, {harness.describe(res['meta']) if 'meta' in res else 'torch ' + res['torch']}, "
             f"{res['dtype']}. Setting: `{res['setting']}`; model batch 8 "
             "(CFG). Peak RSS of a fresh process; base = RSS after loading the model.", "",
             "| model | steps | training | peak (MB) | base (MB) | peak - base (MB) | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["mode"], r["steps"])):
        lines.append(f"| {r['model']} | {r['steps']} | {r['mode']} | {r['peak_mb']:.0f} | {r['base_mb']:.0f} | "
                     f"{r['peak_mb'] - r['base_mb']:.0f} | {r['seconds']:.0f} |")
    lines.append("")
    for model in SIZES:
        for mode in ("trajectory", "stepwise"):
            ms = sorted((r for r in rows if r["model"] == model and r["mode"] == mode), key=lambda r: r["steps"])
            if len(ms) >= 2:
                lines.append(f"- {model}, {mode}: peak at {ms[-1]['steps']} steps / peak at {ms[0]['steps']} steps = "
                             f"{ms[-1]['peak_mb'] / ms[0]['peak_mb']:.2f}")
    lines += ["", "## Memory model", "",
              "| model | trajectory growth (MB/step) | bytes per block per step | alpha (fp32 values per residual element "
              "per block) |", "|---|---|---|---|"]
    for m, f in res["fits"].items():
        lines.append(f"| {m} | {f['mb_per_step']} | {f['bytes_per_block_per_step']:,} | {f['alpha']} |")
    if res.get("fit_checks"):
        lines += ["", "Check of the fit on every trajectory run (growth over the process's base = the graph):", "",
                  "| model | steps | measured peak - base (MB) | alpha x blocks x elements x 4 B x steps (MB) |",
                  "|---|---|---|---|"]
        for c in res["fit_checks"]:
            lines.append(f"| {c['model']} | {c['steps']} | {c['measured_growth_mb']} | {c['predicted_graph_mb']} |")
    lines += ["", f"Extrapolated with alpha = {res['alpha_used']} (the larger of the two), bf16, attention "
              "probabilities not kept (flash attention), text encoder not resident:", "",
              "| target | trajectory (GB) | step-wise (GB) | one step's graph | carried caches | weights |",
              "|---|---|---|---|---|---|"]
    for name, e in res["extrapolation"].items():
        lines.append(f"| {name} | {e['trajectory_gb']} | {e['stepwise_gb']} | {e['one_step_graph_gb']} | "
                     f"{e['carried_caches_gb']} | {e['weights_gb']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
