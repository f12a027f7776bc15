"""Side-by-side evaluation of a schedule: same noise, same seeds, cached vs full compute, one process."""
from __future__ import annotations


def compare(bundle, runners: dict, labels, steps: int, scheduler: str = "ddim", cfg: float = 1.5, seed: int = 0,
            repeats: int = 3, prompts=None, reference: str = "full") -> dict:
    """Sample with every runner (``{name: transformer}``; ``reference`` must be one of them), interleaved
    ``repeats`` times after a warm-up round (which gives the images); report median wall time, speedup over the
    reference and PSNR/SSIM against it."""
    from ..metrics import psnr, ssim
    from ..timing import interleave, medians
    from .sample import sample

    if reference not in runners:
        raise ValueError(f"runners must include the reference {reference!r}")
    images = {}

    def runner(name, tr):
        def run():
            if hasattr(tr, "reset"):
                tr.reset()
            imgs = sample(bundle, labels=labels, prompts=prompts, steps=steps, scheduler=scheduler, cfg=cfg,
                          seed=seed, transformer=tr, progress=False)
            images.setdefault(name, imgs)   # the warm-up round's images
        return run

    med = medians(interleave({name: runner(name, tr) for name, tr in runners.items()}, repeats))
    out = {}
    for name in runners:
        out[name] = dict(seconds=med[name], speedup=med[reference] / med[name],
                         psnr=float(psnr(images[name], images[reference])),
                         ssim=float(ssim(images[name], images[reference])), images=images[name])
    return out


def strip_images(result: dict) -> dict:
    return {k: {kk: vv for kk, vv in v.items() if kk != "images"} for k, v in result.items()}


def default_labels(n: int) -> list[int]:
    return [i % 10 for i in range(n)]
