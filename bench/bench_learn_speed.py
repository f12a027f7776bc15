"""How long learning a schedule takes at a real step count, and what the learned schedules are worth.

For a bundled model at DDIM ``--steps`` and each budget, ``learn_schedule`` runs with the settings of each variant
(``VARIANTS``), budgets and variants interleaved; per run: wall and CPU time, load average before and after,
candidates measured, calibration error, and PSNR / SSIM of the schedule on ``bench_pareto.py``'s evaluation (20
digits, labels ``i mod 10``, noise seed 100). One unit of CPU time: full compute of those digits. The variants and
the reading of the tables: bench/NOTES.md ("Learning speed at DDIM 50").

    nice -n 10 python bench/bench_learn_speed.py --model dit-digits --steps 50 --budgets 0.35 0.5
    # writes learn_speed.{json,md} (``--tag`` appends to the stem)
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import harness
import torch

import l2c_kernels as l2c
from l2c_kernels import metrics, models

#: learn_schedule keywords of each variant
VARIANTS = {
    "before": dict(iterations=30, screen_top=None, teacher_pool=None),
    "after": dict(iterations=16, screen_top=3, teacher_pool=4, screen_samples=None),
    "screening batch": dict(iterations=16, screen_top=3, teacher_pool=4, screen_samples=4),
    "screening batch, 12 iterations": dict(iterations=12, screen_top=3, teacher_pool=4, screen_samples=4),
    "defaults": dict(),
}
EVAL_SEED = 100


def evaluate(bundle, schedule, steps: int, cfg: float, ref: torch.Tensor, labels) -> dict:
    fast = l2c.compile_schedule(bundle.transformer, schedule)
    imgs = models.sample(bundle, labels=labels, steps=steps, cfg=cfg, seed=EVAL_SEED, transformer=fast,
                           progress=False)
    return dict(psnr=round(metrics.psnr(imgs, ref), 2), ssim=round(metrics.ssim(imgs, ref), 4),
                flops_removed=round(schedule.flops_removed_fraction(), 4), forecast=schedule.forecast)


def learn_once(bundle, steps: int, budget: float, cfg: float, kwargs: dict) -> tuple:
    load0 = harness.load_average()
    w0, c0 = time.perf_counter(), time.process_time()
    s = l2c.learn_schedule(bundle, num_inference_steps=steps, budget=budget, cfg=cfg, progress=False, **kwargs)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return s, dict(wall_s=round(wall, 1), cpu_s=round(cpu, 1), load_before=load0, load_after=harness.load_average(),
                   calibration_error_db=s.params.get("calibration_error_db"),
                   candidates_measured=s.params.get("candidates_measured"))


def main(argv=None):
    ap = harness.parser(__doc__)
    ap.add_argument("--model", default="dit-digits", choices=["dit-digits", "pixart-digits"])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.35, 0.5])
    ap.add_argument("--variants", nargs="+", default=["after", "before"], choices=sorted(VARIANTS))
    ap.add_argument("--samples", type=int, default=20, help="evaluation digits (bench_pareto.py's 20)")
    ap.add_argument("--tag", default="", help="appended to the result file stem")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="only combine the rows of these result files (runs made in parallel processes) into "
                         "learn_speed<tag>.{json,md}")
    a = harness.parse(ap, argv)
    if a.merge:
        return write(merge([json.loads(Path(p).read_text()) for p in a.merge]), a.out, a.tag)
    torch.set_num_threads(a.threads)
    bundle = models.load(a.model)
    cfg = bundle.recommended_cfg
    labels = [i % 10 for i in range(a.samples)]
    c0, w0 = time.process_time(), time.perf_counter()
    ref = models.sample(bundle, labels=labels, steps=a.steps, cfg=cfg, seed=EVAL_SEED, progress=False)
    unit = dict(what=f"full compute of the {a.samples} evaluation digits ({a.steps} steps, CFG {cfg})",
                cpu_s=round(time.process_time() - c0, 2), wall_s=round(time.perf_counter() - w0, 2),
                load=harness.load_average())
    harness.log("unit:", unit)
    rows = []
    for b in a.budgets:
        path = harness.RESULTS / f"pareto_{a.model}_{a.steps}_schedules" / f"learned_{round(100 * b)}.l2c.json"
        if path.exists():  # the comparison table's schedule, evaluated here: checks the evaluation matches
            s = l2c.Schedule.load(path)
            rows.append(dict(budget=b, variant="comparison table", wall_s=None, cpu_s=None,
                             calibration_error_db=s.params.get("calibration_error_db"),
                             candidates_measured=s.params.get("candidates_measured"),
                             recorded_train_s=s.params.get("train_seconds"),
                             **evaluate(bundle, s, a.steps, cfg, ref, labels)))
            harness.log(rows[-1])
        for v in a.variants:
            s, row = learn_once(bundle, a.steps, b, cfg, VARIANTS[v])
            row.update(budget=b, variant=v, settings=VARIANTS[v] or "defaults",
                       **evaluate(bundle, s, a.steps, cfg, ref, labels))
            row.update(cpu_units=round(row["cpu_s"] / unit["cpu_s"], 1), unit_cpu_s=unit["cpu_s"])
            rows.append(row)
            harness.log(row)
    res = dict(benchmark="learning speed", dtype="float32", model=a.model, steps=a.steps, sampler="ddim", cfg=cfg,
               samples=a.samples, eval_seed=EVAL_SEED, variants={k: VARIANTS[k] for k in a.variants}, unit=unit,
               rows=rows)
    write(res, a.out, a.tag)


def merge(results: list) -> dict:
    """One result from runs made in parallel processes (each with its own unit measurement)."""
    res = dict(results[0])
    res["variants"] = {k: v for r in results for k, v in r["variants"].items()}
    res["units"] = [r["unit"] for r in results]
    res["rows"] = []
    for r in results:
        seen = {(x["budget"], x["variant"]) for x in res["rows"]}
        res["rows"] += [x for x in r["rows"] if (x["budget"], x["variant"]) not in seen]
    res["rows"].sort(key=lambda x: (x["budget"], x["variant"] != "comparison table", x["variant"]))
    res["merged_from"] = len(results)
    res["meta"] = dict(res.get("meta", {}), command=harness.command())  # what regenerates the merged files
    return res


def write(res: dict, out, tag: str = "") -> None:
    res.setdefault("meta", harness.meta())
    md = markdown(res)
    harness.write_result(out, f"learn_speed{tag}", res, md)
    print(md)


def markdown(res: dict) -> str:
    u = res["unit"]
    md = [f"# Learning speed: {res['model']}, DDIM {res['steps']} steps, CFG {res['cfg']}", "",
          f"{harness.describe({**res, **res.get('meta', {})})}, {res['dtype']}. CPU time is this process's "
          "(time.process_time, all its threads); wall time depends on the other jobs on the machine (load average "
          f"shown: 1, 5, 15 min). One unit = {u['what']}, measured in the same process: "
          + ", ".join(f"{x['cpu_s']} s CPU ({x['wall_s']} s wall, load {x['load'][0]})" for x in res.get("units", [u]))
          + f". Quality: PSNR / SSIM against full compute on the comparison's {res['samples']} digits "
          f"(labels i mod 10, noise seed {res['eval_seed']}).", "",
          "Variants: " + "; ".join(f"`{k}` = {v or 'learn_schedule defaults'}" for k, v in res["variants"].items())
          + ".", "",
          "| budget | variant | CPU s | CPU units | wall s | load before -> after | candidates | calibration error (dB) "
          "| forecast | FLOPs removed | PSNR (dB) | SSIM |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, fmt="{}"):
        return "—" if v is None else fmt.format(v)

    for r in res["rows"]:
        load = "—" if "load_before" not in r else f"{r['load_before'][0]} -> {r['load_after'][0]}"
        wall = f(r.get("wall_s"))
        if r.get("recorded_train_s") is not None:
            wall = f"({r['recorded_train_s']} recorded)"
        md.append(f"| {100 * r['budget']:.0f}% | {r['variant']} | {f(r.get('cpu_s'))} | {f(r.get('cpu_units'))} | "
                  f"{wall} | {load} | {f(r.get('candidates_measured'))} | "
                  f"{f(r.get('calibration_error_db'), '{:.2f}')} | {r['forecast']} | {r['flops_removed']:.3f} | "
                  f"{r['psnr']:.2f} | {r['ssim']:.4f} |")
    if res.get("note"):
        md += ["", res["note"]]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
