"""Change curves for Block Caching (:func:`l2c_kernels.schedules.block_caching`): how much each branch's output
moves from one step to the next on full-compute sampling runs, measured through the library's sampling loop."""
from __future__ import annotations

import torch

from ..adapters import adapter_for
from ..sampling.conditioning import denoiser_for
from .soft_forward import SoftCaches, soft_forward


def measure_change_curves(obj, num_inference_steps: int = 20, *, scheduler: str = "ddim", cfg: float | None = None,
                          num_runs: int = 2, batch_size: int = 4, seed: int = 0, labels=None,
                          prompts=None) -> list[list[list[float]]]:
    """Per-branch change curves for :func:`block_caching`, measured on full-compute sampling runs.

    ``obj`` is anything :func:`~l2c_kernels.learn_schedule` takes (``cfg`` None: the model's default guidance
    scale). Returns
    ``curves[step][block][branch]``: the mean relative L1 change ``mean|y_s - y_{s-1}| / mean|y_{s-1}|``
    of each branch's raw output from the previous step, averaged over ``num_runs`` runs of
    ``batch_size`` samples (step 0 is 0).
    """
    if num_runs < 1 or batch_size < 1:
        raise ValueError("num_runs and batch_size must be >= 1")
    acc = None
    for r in range(num_runs):
        den = denoiser_for(obj, batch_size, cfg, scheduler, seed=seed + r, labels=labels, prompts=prompts)
        model = den.transformer
        ad = adapter_for(model)
        nb, nbr = ad.num_blocks(model), len(ad.branches(model))
        if acc is None:
            acc = [[[0.0] * nbr for _ in range(nb)] for _ in range(num_inference_steps)]
        caches = SoftCaches(nb, nbr)
        prev: dict = {}

        def call(s, args, model=model, caches=caches, prev=prev):
            rec: list = []
            out = soft_forward(model, args, None, caches, record=rec)
            cur = {(b, i): y for b, i, y in rec}
            if prev:
                for (b, i), y in cur.items():
                    p = prev[(b, i)]
                    acc[s][b][i] += float((y - p).abs().mean() / p.abs().mean().clamp_min(1e-12)) / num_runs
            prev.clear()
            prev.update(cur)
            return out

        with torch.no_grad():
            den.run(call, num_inference_steps, den.noise(seed + 1000 * r))
    return acc
