"""Judge the bundled diffusion models: classifier accuracy on generated digits, a sample grid, timing.

    python python/evaluate_models.py --model dit-digits --per-class 100 --steps 50 --cfg 4
    python python/evaluate_models.py --model pixart-digits --per-class 100 --steps 50 --cfg 4
    python python/evaluate_models.py --model flux-digits --per-class 100 --steps 28 --cfg-sweep 1.5,2.5,4,6

Writes bench/results/samples_<model>.png (a 10x10 grid: one row per digit), and
bench/results/eval_<model>.json/.md (accuracy per class and overall, the time to sample 16 images
with 50 steps, device, versions, date); records the accuracy in the model's JSON beside its weights.

flux-digits is sampled with Euler flow matching (``flow-euler``, FlowMatchEulerDiscreteScheduler over
FluxPipeline's sigmas); the other models with the DDPM-family samplers. ``--cfg-sweep`` first measures the
accuracy at each guidance scale on ``--sweep-per-class`` digits per class, records the best (the smallest
on a tie) as the model's ``recommended_cfg`` and evaluates the 1000 digits there.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from l2c_kernels import sampling  # noqa: E402
from l2c_kernels import models  # noqa: E402
from l2c_kernels.models import classifier  # noqa: E402
from l2c_kernels._machine import cpu_name  # noqa: E402
from l2c_kernels.models import load  # noqa: E402
from l2c_kernels.models.registry import MODEL_NAMES, WEIGHTS_DIR  # noqa: E402


FLOW_EULER = "flow-euler"


@functools.lru_cache(maxsize=2)
def _bundle(model: str, weights_dir: str):
    return load(model, weights_dir=Path(weights_dir))


def _draw(model, weights_dir, scheduler, labels, steps, cfg, noise, batch_size=None, progress=True, threads=None):
    """Sample ``labels`` from ``noise`` (one row per label) with the model's sampler; runs in workers too."""
    if threads:
        torch.set_num_threads(threads)
    bundle = _bundle(model, str(weights_dir))
    if scheduler == FLOW_EULER:
        scheduler = "flow-euler"
    return models.sample(bundle, labels=labels, steps=steps, scheduler=scheduler, cfg=cfg, noise=noise,
                           batch_size=batch_size, progress=progress)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=list(MODEL_NAMES))
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--scheduler", default=None, choices=sampling.SCHEDULERS + (FLOW_EULER,),
                    help="default: ddim, or flow-euler for flux-digits (the only sampler it takes)")
    ap.add_argument("--cfg", type=float, default=None,
                    help="default: 4, or the model's recommended scale for flux-digits")
    ap.add_argument("--cfg-sweep", type=str, default=None, help="comma-separated guidance scales to choose from")
    ap.add_argument("--sweep-per-class", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--workers", type=int, default=1,
                    help="processes sampling slices of the digits (each sample's noise is fixed by seed and index)")
    ap.add_argument("--timing-repeats", type=int, default=3, help="runs of the 16-image timing (median)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR,
                    help="where the weights are read and the evaluation recorded")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = _bundle(args.model, str(args.weights_dir))
    flow = bundle.is_flow_matching
    if args.scheduler is None:
        args.scheduler = FLOW_EULER if flow else "ddim"
    if flow != (args.scheduler == FLOW_EULER):
        ap.error(f"{args.model} is sampled with {FLOW_EULER if flow else 'ddim, dpm++ or euler'}, not {args.scheduler}")

    def draw(labels, steps, cfg, seed, progress=True, batch_size=None):
        noise = sampling.initial_noise(len(labels), (1, bundle.image_size, bundle.image_size), seed)
        common = (args.model, str(args.weights_dir), args.scheduler)
        if args.workers <= 1 or len(labels) < 2 * args.workers:
            return _draw(*common, labels, steps, cfg, noise, batch_size, progress)
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        cuts = [round(i * len(labels) / args.workers) for i in range(args.workers + 1)]
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
            parts = [pool.submit(_draw, *common, labels[a:b], steps, cfg, noise[a:b], batch_size, False,
                                 args.threads or 1) for a, b in zip(cuts[:-1], cuts[1:])]
            return torch.cat([f.result() for f in parts])

    sweep = None
    if args.cfg_sweep:
        sweep = {}
        few = [d for d in range(10) for _ in range(args.sweep_per_class)]
        for c in sorted(float(v) for v in args.cfg_sweep.split(",")):
            im = draw(few, args.steps, c, args.seed + 1, batch_size=args.batch_size)
            sweep[c] = float((classifier.predict_digits(im) == torch.tensor(few)).float().mean())
            print(f"cfg {c}: accuracy {sweep[c]:.3f} on {len(few)}", flush=True)
        args.cfg = max(sweep, key=lambda c: (sweep[c], -c))
        meta_file = args.weights_dir / f"{args.model}.json"
        meta = json.loads(meta_file.read_text())
        meta["recommended_cfg"] = args.cfg
        meta_file.write_text(json.dumps(meta, indent=1, default=str))
    if args.cfg is None:
        args.cfg = bundle.recommended_cfg if flow else 4.0
    labels = [d for d in range(10) for _ in range(args.per_class)]
    t0 = time.perf_counter()
    imgs = draw(labels, args.steps, args.cfg, args.seed, batch_size=args.batch_size)
    total_s = time.perf_counter() - t0
    pred = classifier.predict_digits(imgs)
    lab = torch.tensor(labels)
    per_class = {d: float((pred[lab == d] == d).float().mean()) for d in range(10)}
    acc = float((pred == lab).float().mean())

    # grid: the first 10 samples of every class, one row per digit
    grid = torch.stack([imgs[lab == d][:10] for d in range(10)]).flatten(0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    sampling.save_grid(grid, args.out / f"samples_{args.model}.png", nrow=10)

    # the time to sample 16 images with 50 steps (median of --timing-repeats)
    times = []
    for r in range(max(1, args.timing_repeats)):
        t1 = time.perf_counter()
        lab16 = [i % 10 for i in range(16)]  # in this process: no worker start-up in the time
        _draw(args.model, str(args.weights_dir), args.scheduler, lab16, 50, args.cfg,
              sampling.initial_noise(16, (1, bundle.image_size, bundle.image_size), 100 + r), progress=False)
        times.append(time.perf_counter() - t1)
    times.sort()
    res = dict(model=args.model, accuracy=acc, per_class=per_class, samples=len(labels), steps=args.steps,
               scheduler=args.scheduler, cfg=args.cfg, seed=args.seed, sample_all_seconds=round(total_s, 1),
               sample16_50steps_seconds=round(times[len(times) // 2], 2), device=cpu_name(),
               threads=torch.get_num_threads(),
               torch=torch.__version__, dtype="float32", image_shape=list(imgs.shape[1:]), date=str(date.today()),
               seconds_per_image=round(total_s / len(labels), 4), load_average=round(os.getloadavg()[0], 1),
               cfg_sweep=None if sweep is None else {str(c): a for c, a in sweep.items()},
               sweep_per_class=args.sweep_per_class if sweep else None,
               command="python python/evaluate_models.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    (args.out / f"eval_{args.model}.json").write_text(json.dumps(res, indent=1))
    md = [f"# {args.model}: generated digits read by the bundled classifier", "",
          f"{len(labels)} samples ({args.per_class} per class), {args.scheduler.upper()} {args.steps} steps, "
          f"CFG {args.cfg}, seed {args.seed}; {res['device']}, {res['threads']} threads, torch {torch.__version__}, "
          f"float32, {res['date']}.", "",
          "| digit | " + " | ".join(map(str, range(10))) + " | all |",
          "|---" * 12 + "|",
          "| accuracy | " + " | ".join(f"{per_class[d]:.2f}" for d in range(10)) + f" | **{acc:.3f}** |", "",
          *([f"Guidance chosen on {10 * args.sweep_per_class} other samples (seed {args.seed + 1}): "
             + ", ".join(f"CFG {c:g}: {a:.3f}" for c, a in sweep.items()) + f" -> CFG {args.cfg:g} recommended.", ""]
            if sweep else []),
          f"Sampling 16 images with 50 steps: {res['sample16_50steps_seconds']} s (median of {len(times)}); all "
          f"{len(labels)} at {args.steps} steps (batches of {args.batch_size}): {res['seconds_per_image']} s per image "
          f"(load average {res['load_average']} on the machine at the end).",
          f"Grid: `samples_{args.model}.png` (row d = digit d)."]
    (args.out / f"eval_{args.model}.md").write_text("\n".join(md) + "\n")
    meta_file = args.weights_dir / f"{args.model}.json"
    meta = json.loads(meta_file.read_text())
    meta["evaluation"] = {k: res[k] for k in ("accuracy", "samples", "steps", "scheduler", "cfg", "cfg_sweep",
                                             "sample16_50steps_seconds", "date")}
    meta_file.write_text(json.dumps(meta, indent=1, default=str))
    print(json.dumps({k: v for k, v in res.items() if k != "per_class"}, indent=1))


if __name__ == "__main__":
    main()
