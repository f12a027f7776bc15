"""flux-digits: packing and RoPE ids as FluxPipeline makes them, Euler flow-matching sampling against a
float64 reference loop, the training script's records, and (when shipped) the trained weights."""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from l2c_kernels.models import build, flux_digits, load
from l2c_kernels import models
from l2c_kernels.models import classifier  # noqa: E402
from l2c_kernels.models.registry import WEIGHTS_DIR
from l2c_kernels.models.text_encoder import caption_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def random_bundle():
    """The flux-digits architecture with seeded random weights (output layer not zero, so samples move)."""
    torch.manual_seed(0)
    b = build("flux-digits")
    with torch.no_grad():
        b.transformer.proj_out.weight.normal_(0, 0.05)
        b.transformer.proj_out.bias.normal_(0, 0.05)
    b.transformer.eval().requires_grad_(False)
    b.text_encoder.eval().requires_grad_(False)
    return b


def test_architecture_is_flux_with_double_and_single_stream_blocks(random_bundle):
    from diffusers import FluxTransformer2DModel

    tr = random_bundle.transformer
    assert isinstance(tr, FluxTransformer2DModel)
    assert len(tr.transformer_blocks) >= 2 and len(tr.single_transformer_blocks) >= 4
    assert tr.config.in_channels == 4 and not tr.config.guidance_embeds
    assert sum(tr.config.axes_dims_rope) == tr.config.attention_head_dim
    assert random_bundle.image_size == 16 and random_bundle.is_flow_matching


def test_pack_puts_each_2x2_block_in_one_token_with_its_row_col_rope_id():
    img = torch.arange(2 * 256, dtype=torch.float32).view(2, 1, 16, 16)
    tok = flux_digits.pack(img)
    ids = flux_digits.image_ids()
    assert tok.shape == (2, 64, 4) and ids.shape == (64, 3)
    for y in range(16):
        for x in range(16):
            k, c = (y // 2) * 8 + x // 2, (y % 2) * 2 + x % 2
            assert tok[1, k, c] == img[1, 0, y, x]
            assert ids[k].tolist() == [0.0, y // 2, x // 2]
    assert torch.equal(flux_digits.unpack(tok), img)
    assert torch.equal(flux_digits.text_ids(8), torch.zeros(8, 3))


def test_pooled_projection_is_the_mean_over_caption_tokens(random_bundle):
    te = random_bundle.text_encoder
    ids, mask = te.tokenizer(["the digit three", ""])
    enc, pooled = flux_digits.caption_embeddings(te, ids, mask)
    full = te(ids, mask)
    n = int(mask[0].sum())
    torch.testing.assert_close(pooled[0], full[0, :n].mean(0))
    torch.testing.assert_close(pooled[1], full[1, 0])  # empty caption: <bos> only
    assert torch.all(enc[0, n:] == 0) and torch.all(enc[1, 1:] == 0)


def _reference_sample(bundle, captions, noise, steps, cfg):
    """Euler flow matching written out in float64: sigmas linspace(1, 1/N, N) then 0 (shift 1), the transformer
    called with t = sigma, v = v_u + cfg (v_c - v_u), x <- x + (sigma_next - sigma) v."""
    tr = copy.deepcopy(bundle.transformer).double()
    te = copy.deepcopy(bundle.text_encoder).double()
    ids, mask = te.tokenizer([""] * len(captions) + list(captions))
    enc, pooled = flux_digits.caption_embeddings(te, ids, mask)
    x = flux_digits.pack(noise.double())
    sig = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64).tolist() + [0.0]
    for s, s_next in zip(sig[:-1], sig[1:]):
        v = tr(hidden_states=torch.cat([x, x]), encoder_hidden_states=enc, pooled_projections=pooled,
               timestep=torch.full((2 * len(captions),), s, dtype=torch.float64),
               img_ids=flux_digits.image_ids(dtype=torch.float64),
               txt_ids=flux_digits.text_ids(enc.shape[1], dtype=torch.float64)).sample
        vu, vc = v.chunk(2)
        x = x + (s_next - s) * (vu + cfg * (vc - vu))
    return flux_digits.unpack(x).clamp(-1, 1)


def test_sample_matches_a_float64_euler_flow_matching_loop(random_bundle):
    from l2c_kernels.sampling import initial_noise

    labels, steps, cfg = [3, 7, 0], 4, 2.5
    got = models.sample(random_bundle, labels=labels, steps=steps, cfg=cfg, seed=5, progress=False)
    caps = [caption_for(v, i) for i, v in enumerate(labels)]
    with torch.no_grad():
        ref = _reference_sample(random_bundle, caps, initial_noise(3, (1, 16, 16), 5), steps, cfg)
    assert got.shape == (3, 1, 16, 16) and got.dtype == torch.float32
    # float32 vs float64 through 8 blocks and 4 steps: relative rounding ~1e-7 per op, grown by the depth,
    # the CFG factor and the step count; 1e-4 is far above that and far below any sampler difference
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-4)
    assert (got - initial_noise(3, (1, 16, 16), 5).clamp(-1, 1)).abs().max() > 0.1  # the model moved the noise
    # chunking does not change images; the same seed gives the same images
    again = models.sample(random_bundle, labels=labels, steps=steps, cfg=cfg, seed=5, batch_size=2,
                               progress=False)
    torch.testing.assert_close(again, got, rtol=0, atol=1e-6)


def test_unchanged_flux_pipeline_reproduces_sample(random_bundle):
    from l2c_kernels.sampling import initial_noise

    pipe = flux_digits.flux_pipeline(random_bundle)
    pipe.set_progress_bar_config(disable=True)
    caps, noise = ["the digit three", "a 7"], initial_noise(2, (1, 16, 16), 9)
    with torch.no_grad():
        out = pipe(caps, negative_prompt=[""] * 2, true_cfg_scale=3.0, height=16, width=16, num_inference_steps=3,
                   max_sequence_length=8, latents=flux_digits.pack(noise), output_type="pt").images
    ref = models.sample(random_bundle, prompts=caps, steps=3, cfg=3.0, noise=noise, progress=False)
    # the pipeline runs the two CFG halves as separate batches: float32 matmul rounding only (~1e-6)
    torch.testing.assert_close(out * 2 - 1, ref, rtol=0, atol=1e-5)


def test_timesteps_are_flux_pipeline_sigmas_times_1000(random_bundle):
    assert flux_digits.timesteps_for(random_bundle, 4) == pytest.approx([1000.0, 750.0, 500.0, 250.0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(labels=[3, 10]), "labels must be digit classes"),
    (dict(prompts="the digit three"), "list of captions"),
    (dict(labels=[1], steps=0), "positive integer"),
    (dict(labels=[1], noise=torch.zeros(1, 4, 16, 16)), "noise must have shape"),
    (dict(), "pass labels"),
])
def test_bad_input_is_named(random_bundle, kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.sample(random_bundle, progress=False, **kwargs)


def test_pack_rejects_odd_or_multichannel_images():
    with pytest.raises(ValueError, match="even H and W"):
        flux_digits.pack(torch.zeros(1, 1, 15, 16))
    with pytest.raises(ValueError, match="packs"):
        flux_digits.pack(torch.zeros(1, 3, 16, 16))


def test_training_script_writes_loadable_weights_with_its_record(tmp_path):
    spec = importlib.util.spec_from_file_location("train_flux_digits", ROOT / "python" / "train_flux_digits.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--steps", "3", "--batch", "4", "--warmup", "1", "--threads", "1", "--log-every", "1",
              "--checkpoint-every", "2", "--out", str(tmp_path)])
    b = load("flux-digits", weights_dir=tmp_path)
    info = b.info
    assert info["final"] is True and info["steps_done"] == 3 and len(info["loss_log"]) == 3
    assert info["command"].startswith("python python/train_flux_digits.py --steps 3")
    assert b.scheduler_config["shift"] == 1.0 and "prediction_type" not in b.scheduler_config
    # zero-initialised output layer: the first step predicts v = 0, so its loss is E[(noise - x0)^2] > 1
    assert info["loss_log"][0][1] > 1.0
    assert not b.transformer.training and not any(p.requires_grad for p in b.transformer.parameters())


def test_training_script_trains_the_held_out_model_by_name(tmp_path):
    """``--name flux-heldout``: the held-out model of the comparisons, its own size, loadable under its own name and
    sampled with Euler flow matching like flux-digits."""
    from l2c_kernels.models import configs

    spec = importlib.util.spec_from_file_location("train_flux_digits", ROOT / "python" / "train_flux_digits.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--name", "flux-heldout", "--steps", "2", "--batch", "2", "--warmup", "1", "--threads", "1",
              "--out", str(tmp_path), "--seed", "1"])
    b = load("flux-heldout", weights_dir=tmp_path)
    assert b.name == "flux-heldout" and b.is_flow_matching and b.info["seed"] == 1
    assert len(b.transformer.transformer_blocks) == configs.FLUX_HELDOUT["num_layers"] == 1
    assert len(b.transformer.single_transformer_blocks) == configs.FLUX_HELDOUT["num_single_layers"] == 4
    assert not (tmp_path / "flux-digits.safetensors").exists()
    imgs = models.sample(b, labels=[1, 2], steps=2, cfg=2.0, seed=0, progress=False)
    assert imgs.shape == (2, 1, 16, 16) and bool(torch.isfinite(imgs).all())


def _shipped():
    if not (WEIGHTS_DIR / "flux-digits.safetensors").exists():
        pytest.skip("flux-digits weights not present")
    b = load("flux-digits")
    if not b.info.get("final"):
        pytest.skip("flux-digits weights are a training checkpoint")
    return b


def test_shipped_weights_load_deterministically_and_keep_their_recorded_accuracy():
    import math


    b = _shipped()
    assert "rectified flow" in b.info["objective"] and b.info["guidance"].startswith("classifier-free")
    ev = b.info.get("evaluation")
    if not ev:
        pytest.skip("flux-digits has no recorded evaluation (python/evaluate_models.py --model flux-digits)")
    labels = list(range(10)) * 3
    imgs = models.sample(b, labels=labels, steps=ev["steps"], cfg=ev["cfg"], seed=7, progress=False)
    again = models.sample(load("flux-digits"), labels=labels[:4], steps=ev["steps"], cfg=ev["cfg"], seed=7,
                               progress=False)
    torch.testing.assert_close(again, imgs[:4], rtol=0, atol=0)
    acc = float((classifier.predict_digits(imgs) == torch.tensor(labels)).float().mean())
    # 30 fresh samples against the 1000-sample accuracy recorded beside the weights: at most 3 binomial standard
    # deviations below it (variance floored at 0.05 so a recorded 1.0 still allows a miss), far above chance (0.1)
    p = ev["accuracy"]
    assert acc >= p - 3 * math.sqrt(max(p * (1 - p), 0.05) / len(labels)) and acc >= 0.5, (acc, p)


def test_library_sample_chunks_flux_digits_without_changing_it():
    """``models.sample`` samples flux-digits through the library's one loop: chunked runs give the same images (the
    noise and captions are fixed per sample), and a DDPM sampler is refused."""
    from l2c_kernels.models import load

    bundle = load("flux-digits")
    a = models.sample(bundle, labels=[3, 7, 1], steps=3, cfg=2.0, seed=5, progress=False)
    b = models.sample(bundle, labels=[3, 7, 1], steps=3, cfg=2.0, seed=5, progress=False, batch_size=2)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)   # as DDPM chunking: batch size reorders float32 sums only
    with pytest.raises(ValueError, match="flow-matching"):
        models.sample(bundle, labels=[3], steps=3, scheduler="dpm++", progress=False)
