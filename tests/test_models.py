"""Bundled models load from the package's files (no network), with the right shapes, dtypes and modes."""
from __future__ import annotations

import pytest
import torch

from l2c_kernels.models import MODEL_NAMES, load


def _available(name):
    try:
        return load(name)
    except FileNotFoundError:
        pytest.skip(f"{name} weights not present")


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if not n.startswith("flux-")])  # flux: tests/test_flux_digits.py
def test_load_shapes_modes_and_determinism(name):
    b = _available(name)
    tr = b.transformer
    assert not tr.training and not any(p.requires_grad for p in tr.parameters())
    assert len(tr.transformer_blocks) >= 12
    assert tr.config.sample_size == 16 and tr.config.in_channels == 1
    assert b.info.get("final") is True, "the shipped weights come from a finished training run"
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])
    if b.text_encoder is None:
        kw = dict(class_labels=torch.tensor([3, 1000]))
    else:
        enc, mask = b.text_encoder.encode(["the digit three", ""])
        kw = dict(encoder_hidden_states=enc, encoder_attention_mask=mask,
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    out1 = tr(x, timestep=t, **kw).sample
    out2 = load(name).transformer(x, timestep=t, **kw).sample
    assert out1.shape == (2, 1, 16, 16)
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)


def test_load_in_bfloat16():
    b = load("dit-digits", dtype=torch.bfloat16)
    assert next(b.transformer.parameters()).dtype == torch.bfloat16


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model"):
        load("sdxl")
