"""The bundled models', the metrics' and the image writer's refusals, each triggered through the call a user makes
and checked by its message. Only the small flux-digits bundle and the digit classifier are loaded."""
from __future__ import annotations

import functools

import pytest
import torch

from l2c_kernels import metrics, models, sampling
from l2c_kernels.learn import denoiser_for
from l2c_kernels.models.classifier import load_classifier
from l2c_kernels.models.evaluate import compare
from l2c_kernels.models.flux_digits import flux_pipeline
from tests.tiny_models import tiny_dit

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def flux_digits():
    return models.load("flux-digits")


def image(*shape):
    return torch.zeros(*shape)


@pytest.mark.parametrize("call,exception,match", [
    pytest.param(lambda: models.sample(tiny_dit(layers=1)), TypeError,
                 r"sample\(\) takes a bundled model or its name", id="sample-of-a-transformer"),
    pytest.param(lambda: denoiser_for(flux_digits(), labels=[3], height=8), ValueError, " images; got height=",
                 id="flux-digits-of-another-size"),
    pytest.param(lambda: denoiser_for(flux_digits(), prompts=[]), ValueError, "nothing to sample: the prompts",
                 id="flux-digits-without-prompts"),
    pytest.param(lambda: compare(flux_digits(), {"cached": flux_digits().transformer}, labels=[3], steps=2),
                 ValueError, "runners must include the reference ", id="compare-without-reference"),
    pytest.param(lambda: flux_pipeline(models.BundledModel("dit-digits", tiny_dit(layers=1), None, {})), ValueError,
                 "flux_pipeline wraps flux-digits, got ", id="flux-pipeline-of-dit"),
    pytest.param(lambda: load_classifier()(image(2, 1, 28, 28)), ValueError,
                 r"the digit classifier takes \[B, 1, 16, 16\] images", id="classifier-of-other-size"),
])
def test_bundled_model_used_wrongly_is_refused(call, exception, match):
    with pytest.raises(exception, match=match):
        call()


@pytest.mark.parametrize("load,match", [
    pytest.param(lambda d: models.load("dit-digits", weights_dir=d), " not found in .*; train them with ",
                 id="model"),
    pytest.param(lambda d: load_classifier(weights_dir=d), " not found; train it with ", id="classifier"),
])
def test_missing_weights_name_the_training_script(tmp_path, load, match):
    with pytest.raises(FileNotFoundError, match=match):
        load(tmp_path)


@pytest.mark.parametrize("call,exception,match", [
    pytest.param(lambda: metrics.psnr(image(1, 1, 4, 4).tolist(), image(1, 1, 4, 4)), TypeError,
                 " takes two tensors", id="psnr-of-a-list"),
    pytest.param(lambda: metrics.ssim(image(1, 4, 4), image(1, 4, 4)), ValueError,
                 r"ssim expects \[B, C, H, W\] images", id="ssim-of-3d"),
])
def test_metrics_of_wrong_inputs_are_refused(call, exception, match):
    with pytest.raises(exception, match=match):
        call()


def test_image_grid_of_two_channels_is_refused(tmp_path):
    with pytest.raises(ValueError, match="images must have 1 or 3 channels, got "):
        sampling.save_grid(image(2, 2, 4, 4), tmp_path / "grid.png")
