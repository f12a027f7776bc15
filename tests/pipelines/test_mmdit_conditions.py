"""The learner's denoisers for SD3 / Flux / Wan pipelines sample exactly what the pipelines sample."""
from __future__ import annotations

import pytest
import torch

from l2c_kernels.sampling.conditioning import denoiser_for
from l2c_kernels.sampling.mmdit_conditions import pipeline_timesteps
from tests.tiny_pipelines import BUILDERS, CALL_KW, PROMPTS

STEPS = 3
FAMILIES = ["sd3", "flux", "wan"]


@pytest.fixture(scope="module")
def pipes():
    out = {}
    for fam in FAMILIES:
        p = BUILDERS[fam]()
        p.set_progress_bar_config(disable=True)
        out[fam] = p
    return out


def denoiser(pipe, fam, **kw):
    c = dict(CALL_KW[fam], **kw)
    return denoiser_for(pipe, prompts=PROMPTS, cfg=c["guidance_scale"], height=c["height"], width=c["width"],
                        max_sequence_length=c["max_sequence_length"])


def pipeline_latents(pipe, fam, noise):
    kw = dict(CALL_KW[fam])
    if fam == "wan":
        kw["num_frames"] = 4 * (noise.shape[2] - 1) + 1
    out = pipe(prompt=PROMPTS, num_inference_steps=STEPS, latents=noise, output_type="latent", **kw)
    return (out.frames if hasattr(out, "frames") else out.images).float()


@pytest.mark.parametrize("fam", FAMILIES)
def test_denoiser_loop_reproduces_the_pipeline(pipes, fam):
    pipe = pipes[fam]
    den = denoiser(pipe, fam)
    noise = den.noise(3)
    with torch.no_grad():
        got = den.run(den.transformer, STEPS, noise)
    ref = pipeline_latents(pipe, fam, noise)
    scale = float(ref.abs().max())
    # same arithmetic up to batching: Wan's pipeline runs the two CFG halves as two calls, the loop as one batch
    assert float((got.sample - ref).abs().max()) <= 1e-6 * max(1.0, scale) * (10 if fam == "wan" else 1)
    assert got.timesteps == pytest.approx(pipeline_timesteps(pipe, STEPS, height=CALL_KW[fam]["height"],
                                                             width=CALL_KW[fam]["width"])[0])


def test_flux_conditions_follow_the_pipeline(pipes):
    pipe = pipes["flux"]
    den = denoiser(pipe, "flux")
    h, w = CALL_KW["flux"]["height"], CALL_KW["flux"]["width"]
    tokens = (h // 16) * (w // 16)
    assert den.latent_shape == (tokens, 64) and den.cfg == 1.0             # packed 2x2, guidance distilled
    assert den.cond_args["guidance"].tolist() == [CALL_KW["flux"]["guidance_scale"]] * len(PROMPTS)
    ids = den.cond_args["img_ids"]
    assert ids.shape == (tokens, 3) and int(ids[:, 1].max()) == h // 16 - 1 and int(ids[:, 2].max()) == w // 16 - 1
    # resolution-dependent shift: diffusers' own calculate_shift for this token count
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    assert den.sampler(STEPS)["mu"] == pytest.approx(calculate_shift(tokens, 256, 4096, 0.5, 1.15), abs=1e-6)
    big = denoiser(pipe, "flux", height=128, width=256)
    assert big.timesteps(STEPS)[0] == den.timesteps(STEPS)[0] == 1000.0
    assert big.timesteps(STEPS)[1] > den.timesteps(STEPS)[1]               # more tokens, more shift


def test_sd3_and_wan_batch_classifier_free_guidance_uncond_first(pipes):
    sd3 = denoiser(pipes["sd3"], "sd3")
    assert sd3.cond_args["encoder_hidden_states"].shape[0] == 2 * len(PROMPTS) and not sd3.cond_first
    assert sd3.sampler(STEPS)["shift"] == 3.0 and "mu" not in sd3.sampler(STEPS)
    wan = denoiser(pipes["wan"], "wan")
    assert wan.latent_shape[1] == 21                                         # 81 frames -> 21 latent frames
    assert wan.cond_args["encoder_hidden_states"].shape[0] == 2 * len(PROMPTS)


@pytest.mark.parametrize("fam", FAMILIES)
def test_bad_requests_are_refused_with_the_reason(pipes, fam):
    pipe = pipes[fam]
    with pytest.raises(ValueError, match="needs calibration prompts"):
        denoiser_for(pipe, cfg=2.0)
    unit = {"sd3": 16, "flux": 16, "wan": 16}[fam]
    with pytest.raises(ValueError, match=f"height=72 does not fit {type(pipe).__name__}: it must be a positive "
                                         f"multiple of {unit}"):
        denoiser_for(pipe, prompts=PROMPTS, height=72, width=64)
    with pytest.raises(ValueError, match="does not fit"):
        denoiser_for(pipe, prompts=PROMPTS, scheduler="ddim")              # a DDPM sampler for a flow model
