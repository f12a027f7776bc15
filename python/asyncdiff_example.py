"""AsyncDiff in an unchanged diffusers ``DiTPipeline``: the bundled dit-digits split across processes.

    torchrun --nproc_per_node=2 python/asyncdiff_example.py               # 2 components, one per process
    torchrun --nproc_per_node=3 python/asyncdiff_example.py --stride 2    # 2 components, stride 2
    python python/asyncdiff_example.py                                    # one process: the plain model

Every process runs this same script with the same seed; the pipeline's transformer is replaced
by ``parallel.AsyncDenoiser`` and every process ends with the same images. Rank 0 saves them to
``asyncdiff.png`` and, with ``--compare``, also samples with the plain model in one process and
prints the PSNR and the digit classifier's accuracy of both.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from l2c_kernels import metrics, models, parallel, sampling  # noqa: E402
from l2c_kernels.models import classifier  # noqa: E402
from l2c_kernels.models.pipelines import dit_pipeline  # noqa: E402


def run(pipe, labels, args):
    t0 = time.perf_counter()
    out = pipe(class_labels=labels, num_inference_steps=args.steps, guidance_scale=args.cfg,
               generator=torch.Generator().manual_seed(args.seed), output_type="np").images
    images = torch.from_numpy(out).permute(0, 3, 1, 2) * 2 - 1  # [B, C, H, W] in [-1, 1]
    return images, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--stride", type=int, default=1, choices=[1, 2])
    ap.add_argument("--warm-up", type=int, default=3)
    ap.add_argument("--images", type=int, default=20, help="images; labels cycle through 0-9")
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's recommended)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    ap.add_argument("--compare", action="store_true", help="rank 0 also samples with the plain model")
    ap.add_argument("--out", default="asyncdiff.png")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    bundle = models.load("dit-digits")
    if args.cfg is None:
        args.cfg = bundle.recommended_cfg
    pipe = dit_pipeline(bundle)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(args.steps)
    timesteps = [int(t) for t in pipe.scheduler.timesteps]

    world = int(os.environ.get("WORLD_SIZE", "1"))
    n = max(1, world - args.stride + 1)
    pipe.transformer = parallel.AsyncDenoiser(bundle.transformer, num_components=n,
                                              stride=args.stride if world > 1 else 1, warm_up=args.warm_up,
                                              timesteps=timesteps)
    ad = pipe.transformer
    labels = [i % 10 for i in range(args.images)]
    images, seconds = run(pipe, labels, args)

    if ad.rank == 0:
        print(f"{world} process(es), {n} component(s) {ad.component_ranges}, stride {ad.stride}, "
              f"{ad.warm_up} warm-up steps: {args.images} images, {args.steps} DDIM steps in {seconds:.2f} s")
        sampling.save_grid(images, args.out, nrow=10)
        print(f"saved {args.out}; digit classifier accuracy {classifier.class_accuracy(images, labels):.2f}")
    if args.compare and world > 1:
        import torch.distributed as dist

        if ad.rank == 0:
            pipe.transformer = bundle.transformer
            ref, ref_s = run(pipe, labels, args)
            print(f"1 process, plain model: {ref_s:.2f} s ({ref_s / seconds:.2f}x slower); AsyncDiff images vs "
                  f"these: PSNR {metrics.psnr(images, ref):.1f} dB; accuracy of these "
                  f"{classifier.class_accuracy(ref, labels):.2f}")
        dist.barrier()
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main()
