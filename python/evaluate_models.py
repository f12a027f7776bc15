"""Judge the bundled diffusion models: classifier accuracy on generated digits, a sample grid, timing.

    python python/evaluate_models.py --model dit-digits --per-class 100 --steps 50 --cfg 4
    python python/evaluate_models.py --model pixart-digits --per-class 100 --steps 50 --cfg 4

Writes bench/results/samples_<model>.png (a 10x10 grid: one row per digit), and
bench/results/eval_<model>.json/.md (accuracy per class and overall, the time to sample 16 images
with 50 steps, device, versions, date); records the accuracy in the model's JSON beside its weights.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from l2c_kernels import metrics, sampling  # noqa: E402
from l2c_kernels._machine import cpu_name  # noqa: E402
from l2c_kernels.models import load  # noqa: E402
from l2c_kernels.models.registry import WEIGHTS_DIR  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=["dit-digits", "pixart-digits"])
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--scheduler", default="ddim", choices=sampling.SCHEDULERS)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)

    bundle = load(args.model)
    labels = [d for d in range(10) for _ in range(args.per_class)]
    t0 = time.perf_counter()
    imgs = sampling.sample(bundle, labels=labels, steps=args.steps, scheduler=args.scheduler, cfg=args.cfg,
                           seed=args.seed, batch_size=args.batch_size)
    total_s = time.perf_counter() - t0
    pred = metrics.predict_digits(imgs)
    lab = torch.tensor(labels)
    per_class = {d: float((pred[lab == d] == d).float().mean()) for d in range(10)}
    acc = float((pred == lab).float().mean())

    # grid: the first 10 samples of every class, one row per digit
    grid = torch.stack([imgs[lab == d][:10] for d in range(10)]).flatten(0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    sampling.save_grid(grid, args.out / f"samples_{args.model}.png", nrow=10)

    # the time to sample 16 images with 50 steps (median of 3)
    times = []
    for r in range(3):
        t1 = time.perf_counter()
        sampling.sample(bundle, labels=[i % 10 for i in range(16)], steps=50, scheduler=args.scheduler, cfg=args.cfg,
                        seed=100 + r, progress=False)
        times.append(time.perf_counter() - t1)
    times.sort()
    res = dict(model=args.model, accuracy=acc, per_class=per_class, samples=len(labels), steps=args.steps,
               scheduler=args.scheduler, cfg=args.cfg, seed=args.seed, sample_all_seconds=round(total_s, 1),
               sample16_50steps_seconds=round(times[1], 2), device=cpu_name(), threads=torch.get_num_threads(),
               torch=torch.__version__, dtype="float32", image_shape=list(imgs.shape[1:]), date=str(date.today()),
               command="python python/evaluate_models.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    (args.out / f"eval_{args.model}.json").write_text(json.dumps(res, indent=1))
    md = [f"# {args.model}: generated digits read by the bundled classifier", "",
          f"{len(labels)} samples ({args.per_class} per class), {args.scheduler.upper()} {args.steps} steps, "
          f"CFG {args.cfg}, seed {args.seed}; {res['device']}, {res['threads']} threads, torch {torch.__version__}, "
          f"float32, {res['date']}.", "",
          "| digit | " + " | ".join(map(str, range(10))) + " | all |",
          "|---" * 12 + "|",
          "| accuracy | " + " | ".join(f"{per_class[d]:.2f}" for d in range(10)) + f" | **{acc:.3f}** |", "",
          f"Sampling 16 images with 50 steps: {res['sample16_50steps_seconds']} s (median of 3).",
          f"Grid: `samples_{args.model}.png` (row d = digit d)."]
    (args.out / f"eval_{args.model}.md").write_text("\n".join(md) + "\n")
    meta_file = WEIGHTS_DIR / f"{args.model}.json"
    meta = json.loads(meta_file.read_text())
    meta["evaluation"] = {k: res[k] for k in ("accuracy", "samples", "steps", "scheduler", "cfg",
                                             "sample16_50steps_seconds", "date")}
    meta_file.write_text(json.dumps(meta, indent=1, default=str))
    print(json.dumps({k: v for k, v in res.items() if k != "per_class"}, indent=1))


if __name__ == "__main__":
    main()
