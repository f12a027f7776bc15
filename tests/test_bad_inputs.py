"""Bad inputs to the compiled module and to AsyncDenoiser: NaN latents, a dtype or device other than
the weights'. Each should be refused with an error naming the problem before any block runs."""
from __future__ import annotations

import pytest
import torch

import l2c_kernels as l2c
from l2c_kernels import parallel
from tests.tiny_models import dit_inputs, tiny_dit

TS = [981, 781, 581]


def compiled():
    m = tiny_dit(layers=2)
    mask = [[[True, True]] * 2] + [[[False, True]] * 2] * (len(TS) - 1)
    return l2c.compile_schedule(m, l2c.Schedule.from_mask(m, TS, mask), cuda_graphs=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_compiled_module_names_an_input_dtype_other_than_the_weights(dtype):
    with pytest.raises(ValueError, match=f"hidden_states.*{str(dtype).split('.')[1]}.*float32"):
        compiled()(**dit_inputs(dtype=dtype))


def test_compiled_module_names_nan_latents():
    x = dit_inputs()
    x["hidden_states"][0, 0, 0, 0] = float("nan")
    fast = compiled()
    with pytest.raises(ValueError, match="NaN"):
        fast(**x)
    assert fast.current_step is None  # refused before the step was counted


def asyncdiff():
    return parallel.AsyncDenoiser(tiny_dit(layers=4), num_components=2, warm_up=1, emulate=True, balance="uniform")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_asyncdiff_names_an_input_dtype_other_than_the_weights(dtype):
    ad = asyncdiff()
    with pytest.raises(ValueError, match=f"hidden_states is {dtype} on cpu but the model's weights are torch.float32"):
        ad(**dit_inputs(dtype=dtype))
    assert ad.current_step is None  # refused before the step was counted


def test_asyncdiff_names_an_input_device_other_than_the_weights():
    ad = asyncdiff()
    x = dit_inputs()
    x["hidden_states"] = x["hidden_states"].to("meta")
    with pytest.raises(ValueError, match="on meta but the model's weights are torch.float32 on cpu"):
        ad(**x)


def test_asyncdiff_names_nan_latents_and_recovers():
    ad = asyncdiff()
    x = dit_inputs()
    x["hidden_states"][1, 0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"latents of step 0 contain NaN or infinite values \(1 of 512\)"):
        ad(**x)
    good = dit_inputs()
    torch.testing.assert_close(ad(**good).sample, ad.transformer(**good).sample, rtol=0, atol=0)  # warm-up step
