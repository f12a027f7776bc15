"""adaln_modulate: LayerNorm(x) * (1 + scale[:, None]) + shift[:, None] (no affine), on every backend."""
from __future__ import annotations

import pytest
import torch

from l2c_kernels import ops

from .conftest import (HAS_CUDA, TRITON_INTERPRETED, assert_close, backend_params, compile_backend_params,
                       compiled, cpu_backend_params, f64, needs_extension, rand)


def _reference(x, shift, scale, eps):
    """float64 result (differentiable) and the magnitude of its terms for the error bound:
    ``(|x| + |mean|) / std * (1 + |scale|) + |shift|`` (float32 rounding of ``x`` and of the mean
    is amplified by ``1 / std``)."""
    x64, sh, sc = (t.to(device="cpu", dtype=torch.float64) for t in (x, shift, scale))
    sh, sc = sh[:, None, :], sc[:, None, :]
    mean = x64.mean(dim=-1, keepdim=True)
    var = ((x64 - mean) ** 2).mean(dim=-1, keepdim=True)
    rstd = 1 / torch.sqrt(var + eps)
    n = (x64 - mean) * rstd
    mag = (x64.abs() + mean.abs()) * rstd * (1 + sc.abs()) + sh.abs()
    return n * (1 + sc) + sh, mag.detach()


def _check_output(out, x):
    assert out.dtype == x.dtype and out.shape == x.shape and out.device == x.device
    assert out.is_contiguous()
    assert out.data_ptr() != x.data_ptr() or x.numel() == 0


@pytest.mark.parametrize("device,backend,dtype,shape", backend_params())
def test_matches_float64(device, backend, dtype, shape, gen):
    B, N, C = shape
    x = rand(B, N, C, dtype=dtype, device=device, gen=gen)
    shift = rand(B, C, dtype=dtype, device=device, gen=gen)
    scale = rand(B, C, dtype=dtype, device=device, gen=gen)
    inputs = [t.clone() for t in (x, shift, scale)]
    ref, mag = _reference(x, shift, scale, 1e-6)

    out = ops.adaln_modulate(x, shift, scale, 1e-6, backend=backend)

    _check_output(out, x)
    assert_close(out, ref, mag, dtype, "out")
    assert all(torch.equal(a, b) for a, b in zip((x, shift, scale), inputs)), "the inputs are read-only"


@pytest.mark.parametrize("device,backend,dtype,shape", backend_params(dtypes=[torch.float32], shapes=[(2, 5, 72)], interpreter_shapes=[(2, 5, 72)]))
def test_noncontiguous_inputs_are_accepted(device, backend, dtype, shape, gen):
    """shift and scale taken with .chunk from a [B, 6C] embedding (as DiT blocks do), x transposed."""
    B, N, C = shape
    emb = rand(B, 6 * C, device=device, gen=gen)
    shift, scale = emb.chunk(6, dim=1)[:2]
    x = rand(B, C, N, device=device, gen=gen).transpose(1, 2)
    assert not (shift.is_contiguous() or scale.is_contiguous() or x.is_contiguous())
    ref, mag = _reference(x, shift, scale, 1e-6)
    out = ops.adaln_modulate(x, shift, scale, backend=backend)
    _check_output(out, x)
    assert_close(out, ref, mag, dtype)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # eps=0: the Triton interpreter (numpy) divides by 0 in masked lanes
@pytest.mark.parametrize("device,backend,dtype,shape", backend_params(dtypes=[torch.float32], shapes=[(2, 3, 1153)], interpreter_shapes=[(2, 3, 72)]))
def test_eps(device, backend, dtype, shape, gen):
    """eps is added to the variance inside the square root; constant rows give exactly shift."""
    B, N, C = shape
    x = rand(B, N, C, device=device, gen=gen) * 0.1
    x[1, 2] = 3.0
    shift, scale = rand(B, C, device=device, gen=gen), rand(B, C, device=device, gen=gen)
    for eps in (1e-5, 0.5):
        ref, mag = _reference(x, shift, scale, eps)
        out = ops.adaln_modulate(x, shift, scale, eps, backend=backend)
        assert_close(out, ref, mag, dtype, f"eps={eps}")
        assert torch.equal(out[1, 2], shift[1])
    ref, mag = _reference(x[:1], shift[:1], scale[:1], 0.0)
    assert_close(ops.adaln_modulate(x[:1], shift[:1], scale[:1], 0, backend=backend), ref, mag, dtype, "eps=0")


@pytest.mark.parametrize("device,backend,dtype,shape", backend_params(dtypes=[torch.float32], shapes=[(2, 4, 1153)], interpreter_shapes=[(2, 4, 72)]))
def test_rows_with_a_large_mean_keep_their_variance(device, backend, dtype, shape, gen):
    """Rows of 1000 + N(0, 1) normalise to within float32 rounding of x and of the mean (~1e-4 here,
    bound ~8e-3); a one-pass E[x^2] - E[x]^2 variance would be off by several percent."""
    B, N, C = shape
    x = 1000 + rand(B, N, C, device=device, gen=gen)
    shift, scale = rand(B, C, device=device, gen=gen), rand(B, C, device=device, gen=gen)
    ref, mag = _reference(x, shift, scale, 1e-6)
    out = ops.adaln_modulate(x, shift, scale, backend=backend)
    assert_close(out, ref, mag, dtype)


def test_empty_tensors():
    for B, N, C in ((0, 3, 8), (2, 0, 8), (2, 3, 0)):
        x = torch.empty(B, N, C)
        out = ops.adaln_modulate(x, torch.empty(B, C), torch.empty(B, C))
        assert out.shape == (B, N, C) and out.dtype == x.dtype


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter (numpy)
@pytest.mark.parametrize("backend", cpu_backend_params())
def test_nan_stays_in_its_row(backend, gen):
    x = rand(2, 3, 8, gen=gen)
    x[0, 1, 2] = float("nan")
    shift, scale = rand(2, 8, gen=gen), rand(2, 8, gen=gen)
    out = ops.adaln_modulate(x, shift, scale, backend=backend)
    rows_with_nan = out.isnan().any(dim=-1)
    assert rows_with_nan[0, 1] and int(rows_with_nan.sum()) == 1
    assert out[0, 1].isnan().all()


# ---------------------------------------------------------------------------------------- bad input


def _args(gen, B=2, N=3, C=8):
    return rand(B, N, C, gen=gen), rand(B, C, gen=gen), rand(B, C, gen=gen)


BAD = {
    "x rank": (lambda x, sh, sc: (x[0], sh, sc, 1e-6), "'x' must be a 3-D \\[B, N, C\\] tensor, got shape \\[3, 8\\]"),
    "x dtype": (lambda x, sh, sc: (x.double(), sh.double(), sc.double(), 1e-6), "'x' must be float32, float16 or bfloat16, got torch.float64"),
    "x integer": (lambda x, sh, sc: (x.int(), sh.int(), sc.int(), 1e-6), "'x' must be float32, float16 or bfloat16, got torch.int32"),
    "x not a tensor": (lambda x, sh, sc: (x.tolist(), sh, sc, 1e-6), "'x' must be a torch.Tensor"),
    "shift [B, 1, C]": (lambda x, sh, sc: (x, sh[:, None], sc, 1e-6), "'shift' must have shape \\[B, C\\] = \\[2, 8\\] to match 'x' of shape \\[2, 3, 8\\], got \\[2, 1, 8\\]"),
    "shift channels": (lambda x, sh, sc: (x, torch.randn(2, 9), sc, 1e-6), "'shift' must have shape \\[B, C\\] = \\[2, 8\\]"),
    "scale batch": (lambda x, sh, sc: (x, sh, sc[:1], 1e-6), "'scale' must have shape \\[B, C\\] = \\[2, 8\\] to match 'x' of shape \\[2, 3, 8\\], got \\[1, 8\\]"),
    "shift dtype": (lambda x, sh, sc: (x, sh.bfloat16(), sc, 1e-6), "'shift' has dtype torch.bfloat16 but 'x' has dtype torch.float32"),
    "scale dtype": (lambda x, sh, sc: (x, sh, sc.half(), 1e-6), "'scale' has dtype torch.float16 but 'x' has dtype torch.float32"),
    "shift device": (lambda x, sh, sc: (x, sh.to("meta"), sc, 1e-6), "'shift' is on meta but 'x' is on cpu"),
    "scale device": (lambda x, sh, sc: (x, sh, sc.to("meta"), 1e-6), "'scale' is on meta but 'x' is on cpu"),
    "scale not a tensor": (lambda x, sh, sc: (x, sh, 1.0, 1e-6), "'scale' must be a torch.Tensor"),
    "eps negative": (lambda x, sh, sc: (x, sh, sc, -1e-6), "'eps' must be a float >= 0, got -1e-06"),
    "eps nan": (lambda x, sh, sc: (x, sh, sc, float("nan")), "'eps' must be a float >= 0, got nan"),
    "eps tensor": (lambda x, sh, sc: (x, sh, sc, torch.tensor(1e-6)), "'eps' must be a float >= 0"),
    "eps None": (lambda x, sh, sc: (x, sh, sc, None), "'eps' must be a float >= 0, got None"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_rejected(case, gen):
    make, match = BAD[case]
    with pytest.raises(ValueError, match=match):
        ops.adaln_modulate(*make(*_args(gen)))


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (tensors on two devices)")
def test_cuda_device_mismatch_is_rejected(gen):
    x, sh, sc = _args(gen)
    with pytest.raises(ValueError, match="'scale' is on cpu but 'x' is on cuda"):
        ops.adaln_modulate(x.cuda(), sh.cuda(), sc)


# ------------------------------------------------------------------------ autograd, opcheck, compile


def test_torch_backend_is_differentiable(gen):
    """With inputs that require grad the torch backend runs; its gradients match float64 autograd."""
    x, shift, scale = (t.requires_grad_() for t in _args(gen, N=5, C=72))
    w = rand(2, 5, 72, gen=gen)
    (ops.adaln_modulate(x, shift, scale) * w).sum().backward()
    leaves = [f64(t).requires_grad_() for t in (x, shift, scale)]
    (_reference(*leaves, 1e-6)[0] * f64(w)).sum().backward()
    for got, want, name in zip((x, shift, scale), leaves, ("x", "shift", "scale")):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-4, msg=name)
    for backend in set(ops.available_backends("cpu")) - {"torch"}:
        with pytest.raises(ValueError, match="not differentiable"):
            ops.adaln_modulate(x, shift, scale, backend=backend)


@needs_extension
def test_opcheck():
    g = torch.Generator().manual_seed(0)
    for B, N, C in ((2, 3, 5), (1, 1, 1)):
        args = (rand(B, N, C, gen=g), rand(B, C, gen=g), rand(B, C, gen=g), 1e-6)
        torch.library.opcheck(torch.ops.l2c.adaln_modulate.default, args)


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="Triton kernels are checked on CPU under the interpreter")
def test_opcheck_triton():
    g = torch.Generator().manual_seed(0)
    ops._triton()
    args = (rand(2, 3, 5, gen=g), rand(2, 5, gen=g), rand(2, 5, gen=g), 1e-6)
    torch.library.opcheck(torch.ops.l2c_triton.adaln_modulate.default, args)


@pytest.mark.parametrize("backend", compile_backend_params())
def test_torch_compile_fullgraph(backend, first_use, gen):
    """The wrapper traces without graph breaks (also as the first use of the op in the process),
    with shift and scale chunked from an embedding inside the graph."""
    def modulate(x, emb):
        shift, scale = emb.chunk(6, dim=1)[:2]
        return ops.adaln_modulate(x + 1, shift, scale, 1e-6, backend=backend) * 2

    x, emb = rand(2, 5, 72, gen=gen), rand(2, 6 * 72, gen=gen)
    want = modulate(x, emb)
    got = compiled(modulate)(x, emb)
    assert torch.equal(got, want)
