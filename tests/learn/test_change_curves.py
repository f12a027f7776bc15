"""Change curves (block caching) measured through the library's sampling loop equal forward hooks on the
plain diffusers model sampled by a plain diffusers loop from the same noise."""
from __future__ import annotations

import torch

from l2c_kernels.learn.change_curves import measure_change_curves
from l2c_kernels.models import BundledModel
from l2c_kernels.models.configs import NOISE_SCHEDULE
from tests.tiny_models import tiny_dit


def test_change_curves_equal_hooks_on_the_plain_model():
    from diffusers import DDIMScheduler

    model = tiny_dit(layers=2)
    bundle = BundledModel("dit-digits", model, None, dict(NOISE_SCHEDULE), info=dict(recommended_cfg=2.0))
    steps, seed, n = 3, 5, 2
    curves = measure_change_curves(bundle, steps, cfg=2.0, num_runs=1, batch_size=n, seed=seed)
    # reference: hooks on attn1 / ff, a plain DDIM loop (no clipping step trick needed: same config, same step)
    rec = {}
    hooks = [getattr(blk, name).register_forward_hook(
        lambda m, a, out, key=(b, i): rec.__setitem__(key, (out[0] if isinstance(out, tuple) else out).clone()))
        for b, blk in enumerate(model.transformer_blocks) for i, name in enumerate(["attn1", "ff"])]
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)          # the bundled model's draw for this seed
    x = torch.randn((n, 4, 8, 8), generator=torch.Generator().manual_seed(seed))  # run 0's noise
    from l2c_kernels.sampling import make_scheduler

    sch = make_scheduler(NOISE_SCHEDULE, "ddim")
    sch.set_timesteps(steps)
    x = x * sch.init_noise_sigma
    prev, want = None, []
    try:
        with torch.no_grad():
            for t in sch.timesteps:
                out = model(torch.cat([x, x]), timestep=t.expand(2 * n),
                            class_labels=torch.cat([torch.full_like(labels, 1000), labels])).sample
                u, c = out.chunk(2)
                cur = dict(rec)
                want.append([[0.0 if prev is None else float((cur[(b, i)] - prev[(b, i)]).abs().mean()
                                                              / prev[(b, i)].abs().mean()) for i in range(2)]
                             for b in range(2)])
                prev = cur
                x = sch.step(u + 2.0 * (c - u), t, x).prev_sample
    finally:
        for h in hooks:
            h.remove()
    assert isinstance(sch, DDIMScheduler)
    torch.testing.assert_close(torch.tensor(curves, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-4, atol=1e-7)
    assert torch.tensor(want)[1:].min() > 0.01  # the curves measure something
