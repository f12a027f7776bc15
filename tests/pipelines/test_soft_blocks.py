"""The block-level soft forward: exact at hard weights, differentiable in between."""
from __future__ import annotations

import pytest
import torch

import l2c_kernels as l2c
from l2c_kernels import schedules
from l2c_kernels.sampling.conditioning import denoiser_for
from l2c_kernels.learn.soft_forward import soft_block_forward
from l2c_kernels.learn.soft_forward import SoftCaches, soft_forward
from tests.tiny_pipelines import BUILDERS, CALL_KW, PROMPTS

STEPS = 4
FAMILIES = ["sd3", "flux", "wan"]


@pytest.fixture(scope="module")
def dens():
    out = {}
    for fam in FAMILIES:
        kw = CALL_KW[fam]
        out[fam] = denoiser_for(BUILDERS[fam](), prompts=PROMPTS, cfg=kw["guidance_scale"], height=kw["height"],
                                width=kw["width"], max_sequence_length=kw["max_sequence_length"])
    return out


def soft_run(den, w_all, forecast="none", noise=None):
    nb = w_all.shape[1]
    caches = SoftCaches(nb, 1, forecast)
    return den.run(lambda s, args: soft_forward(den.transformer, args, w_all[s], caches), STEPS,
                   den.noise(0) if noise is None else noise).sample


@pytest.mark.parametrize("fam,forecast", [("sd3", "none"), ("flux", "none"), ("wan", "none"), ("flux", "linear")])
def test_hard_weights_give_the_compiled_schedule(dens, fam, forecast):
    den = dens[fam]
    model = den.transformer
    ts = den.timesteps(STEPS)
    sched = schedules.uniform(model, ts, interval=2, forecast=forecast)
    w = torch.tensor([[[1.0 if e == "C" else 0.0] for e in row] for row in sched.plan])
    with torch.no_grad():
        full = den.run(model, STEPS, den.noise(0)).sample
        ones = soft_run(den, torch.ones_like(w), forecast)
        soft = soft_run(den, w, forecast)
        compiled = den.run(l2c.compile_schedule(model, sched), STEPS, den.noise(0)).sample
    scale = float(full.abs().max())
    assert float((ones - full).abs().max()) <= 1e-5 * scale      # all computed: the model itself
    assert float((compiled - full).abs().max()) > 1e-3 * scale   # reuse changes the samples ...
    assert float((soft - compiled).abs().max()) <= 1e-5 * scale  # ... as the soft forward at w in {0, 1} does


def test_dispatch_and_refusals(dens):
    den = dens["flux"]
    nb = len(den.transformer.transformer_blocks) + len(den.transformer.single_transformer_blocks)
    args = den.model_args(den.noise(0), torch.tensor(1000.0))
    with torch.no_grad():
        direct = soft_block_forward(den.transformer, args, None, SoftCaches(nb, 1))
        plain = den.transformer(**args).sample
    # x + (out - x) rounds once per block and stream: a few float32 ulps of the activations
    assert float((direct - plain).abs().max()) <= 1e-6 * float(plain.abs().max())
    with pytest.raises(ValueError, match=rf"w has shape \[2, 1\]; the block-level soft forward of "
                                         rf"FluxTransformer2DModel takes one weight per block, \[{nb}, 1\]"):
        soft_block_forward(den.transformer, args, torch.ones(2, 1), SoftCaches(nb, 1))


@pytest.mark.parametrize("fam", ["flux", "wan"])
def test_gradient_matches_finite_differences(dens, fam, monkeypatch):
    """d(final-sample error)/dw in float64 against central differences, at interior weights."""
    from diffusers.models.normalization import FP32LayerNorm

    def fp64_layer_norm(self, x):
        p = [None if v is None else v.double() for v in (self.weight, self.bias)]
        return torch.nn.functional.layer_norm(x.double(), self.normalized_shape, *p, self.eps).to(x.dtype)

    # Wan's FP32LayerNorm computes in float32 whatever the model's dtype: run it in float64 like the rest
    monkeypatch.setattr(FP32LayerNorm, "forward", fp64_layer_norm)
    den = dens[fam]
    model = den.transformer.double()
    try:
        den.cond_args = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                         for k, v in den.cond_args.items()}
        noise = den.noise(0).double()
        nb = sum(1 for _ in _blocks(model))
        g = torch.Generator().manual_seed(0)
        w = torch.rand((STEPS, nb, 1), generator=g, dtype=torch.float64) * 0.8 + 0.1
        w[0] = 1.0
        sched = den.scheduler(STEPS)
        sigmas, ts = sched.sigmas.double(), sched.timesteps

        def euler64(wv):
            """Flow-matching Euler in float64 (the library's loop keeps float32 latents)."""
            caches, x = SoftCaches(nb, 1), noise
            for i, t in enumerate(ts):
                out = soft_forward(model, den.model_args(den.batch(x), t), None if wv is None else wv[i], caches)
                x = x + (sigmas[i + 1] - sigmas[i]) * den.guided(out)
            return x

        with torch.no_grad():
            target = euler64(None)
            assert float((target - den.run(model, STEPS, noise).sample.double()).abs().max()) < 1e-4

        def loss(wv):
            return (euler64(wv) - target).pow(2).mean()

        wv = w.clone().requires_grad_(True)
        loss(wv).backward()
        def central(s, b, eps):
            hi, lo = w.clone(), w.clone()
            hi[s, b, 0] += eps
            lo[s, b, 0] -= eps
            with torch.no_grad():
                return float((loss(hi) - loss(lo)) / (2 * eps))

        for s, b in [(1, 0), (2, nb - 1), (3, nb // 2)]:
            # Richardson: the eps^2 term cancels; eps stays large because float32 variances inside
            # RMSNorm add ~1e-7 relative noise to the loss
            fd = (4 * central(s, b, 1e-3) - central(s, b, 2e-3)) / 3
            assert float(wv.grad[s, b, 0]) == pytest.approx(fd, rel=1e-4, abs=1e-12)
        assert float(wv.grad[1:].abs().sum()) > 0
    finally:
        model.float()


def _blocks(model):
    from l2c_kernels.adapters.patterns import find_blocks

    return find_blocks(model)
