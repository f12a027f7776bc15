"""FluxPipeline's true classifier-free guidance (``true_cfg_scale`` > 1 with a ``negative_prompt``) in the
learner's Flux denoiser, on the tiny Flux.1-dev-shaped pipeline (guidance embedding as well) and on the
FluxPipeline around flux-digits (whose only guidance is true CFG).

Reference: the unmodified diffusers FluxPipeline from the same packed latents. It calls the transformer
twice per step (prompt, negative prompt), the denoiser once on the batch ``[negative; prompt]``: the same
float32 arithmetic up to the batched matmuls' rounding, so 1e-5 relative to the latents' scale (the
un-batched comparison of ``tests/pipelines/test_mmdit_conditions.py`` holds 1e-6).
"""
from __future__ import annotations

import pytest
import torch

import l2c_kernels as l2c
from l2c_kernels.learn import denoiser_for
from l2c_kernels.sampling.mmdit_conditions import pipeline_timesteps
from tests.tiny_pipelines import CALL_KW, PROMPTS, tiny_flux_pipeline

STEPS = 3
KW = CALL_KW["flux"]                    # 64 x 128 pixels, guidance embedding 3.5, 32 T5 tokens
NEG = ["", "blurry, dark"]
TRUE_CFG = 4.0
FAST = dict(iterations=2, batch_size=2, calibration_samples=2, progress=False, structured_candidates=False)


@pytest.fixture(scope="module")
def pipe():
    p = tiny_flux_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def _den(pipe, **kw):
    return denoiser_for(pipe, prompts=PROMPTS, cfg=KW["guidance_scale"], height=KW["height"], width=KW["width"],
                        max_sequence_length=KW["max_sequence_length"], **kw)


def _pipeline_latents(pipe, noise, **kw):
    with torch.no_grad():
        return pipe(prompt=PROMPTS, num_inference_steps=STEPS, latents=noise, output_type="latent", **KW,
                    **kw).images.float()


def test_true_cfg_denoiser_reproduces_the_pipeline(pipe):
    den = _den(pipe, true_cfg_scale=TRUE_CFG, negative_prompt=NEG)
    assert den.cfg == TRUE_CFG and not den.cond_first                      # [negative; prompt]
    assert den.cond_args["encoder_hidden_states"].shape[0] == 2 * len(PROMPTS)
    assert den.cond_args["guidance"].tolist() == [KW["guidance_scale"]] * 4   # the embedding in both halves
    noise = den.noise(3)
    model = den.transformer
    full = l2c.compile_schedule(model, l2c.Schedule.full(model, den.timesteps(STEPS), branches=["block"]))
    got, _ = den.sample_with(full, STEPS, noise)
    ref = _pipeline_latents(pipe, noise, true_cfg_scale=TRUE_CFG, negative_prompt=NEG)
    scale = max(1.0, float(ref.abs().max()))
    assert float((got - ref).abs().max()) <= 1e-5 * scale
    # the guidance is really there: without it the pipeline samples something else
    plain = _pipeline_latents(pipe, noise)
    assert float((plain - ref).abs().max()) > 1e-2 * scale


def test_learned_schedule_with_true_cfg_records_both_guidances(pipe):
    sched = l2c.learn_schedule(pipe, STEPS, 0.5, prompts=PROMPTS, height=KW["height"], width=KW["width"],
                               guidance_scale=KW["guidance_scale"], max_sequence_length=KW["max_sequence_length"],
                               true_cfg_scale=TRUE_CFG, negative_prompt=NEG, **FAST)
    sched.validate_for(pipe.transformer)
    ts, sampler = pipeline_timesteps(pipe, STEPS, height=KW["height"], width=KW["width"])
    assert sched.timesteps == pytest.approx(ts) and sched.sampler == sampler and "mu" in sched.sampler
    assert sched.params["guidance_scale"] == KW["guidance_scale"]             # the distilled embedding
    assert sched.params["true_cfg_scale"] == TRUE_CFG and sched.params["negative_prompt"] == NEG
    # 2 learnable steps x 3 blocks of unequal cost (1 double-, 2 single-stream): the budget is met, and overshot by
    # at most one step's work (a step-level schedule removes whole steps; a per-block one, one block's share of a step)
    frac = sched.flops_removed_fraction()
    assert 0.5 - 1e-9 <= frac <= 0.5 + 1.0 / STEPS + 1e-9 and "R" in str(sched.plan)


def test_flux_digits_pipeline_true_cfg_is_the_bundled_learner(pipe):
    """flux-digits behind an unmodified FluxPipeline (true CFG 7, negative prompt "") gives the learner the
    same denoiser as the bundled model: same timesteps, same samples."""
    from l2c_kernels.models import flux_digits, load

    bundle = load("flux-digits")
    fp = flux_digits.flux_pipeline(bundle)
    fp.set_progress_bar_config(disable=True)
    caps = ["the digit three", "a 7"]
    by_pipe = denoiser_for(fp, prompts=caps, height=16, width=16, max_sequence_length=8, true_cfg_scale=7.0,
                           negative_prompt="")
    by_name = denoiser_for(bundle, prompts=caps)
    assert by_pipe.cfg == by_name.cfg == 7.0 and by_pipe.latent_shape == by_name.latent_shape == (64, 4)
    assert by_pipe.timesteps(STEPS) == by_name.timesteps(STEPS)
    noise = by_name.noise(4)
    a, _ = by_pipe.sample_with(bundle.transformer, STEPS, noise)
    b, _ = by_name.sample_with(bundle.transformer, STEPS, noise)
    torch.testing.assert_close(a.clamp(-1, 1), b, rtol=0, atol=1e-5)   # the bundled denoiser clamps to pixels


def test_true_cfg_errors_name_the_problem(pipe):
    with pytest.raises(ValueError, match="true_cfg_scale=4.0 needs a negative_prompt"):
        _den(pipe, true_cfg_scale=TRUE_CFG)
    with pytest.raises(ValueError, match="negative_prompt has 3 entries for 2 prompts"):
        _den(pipe, true_cfg_scale=TRUE_CFG, negative_prompt=["a", "b", "c"])
    with pytest.raises(ValueError, match="FluxPipeline's true CFG; BundledModel takes guidance_scale"):
        denoiser_for("flux-digits", labels=[1], true_cfg_scale=2.0, negative_prompt="")
