"""cfg_mean_store_: x += y and cache <- (y[:B/2] + y[B/2:]) / 2, on every backend."""
from __future__ import annotations

import pytest
import torch

from l2c_kernels import ops

from .conftest import (HAS_CUDA, TRITON_INTERPRETED, assert_close, backend_params, compile_backend_params, compiled, cpu_backend_params, f64,
                       needs_extension, poisoned, rand)


def _reference(x, y):
    """float64 results and the magnitudes of their terms (for the error bound)."""
    x64, y64 = f64(x), f64(y)
    h = x64.shape[0] // 2
    ya, yb = y64[:h], y64[h:]
    return (x64 + y64, x64.abs() + y64.abs()), ((ya + yb) / 2, (ya.abs() + yb.abs()) / 2)


def _even(shape):
    B, N, C = shape
    return (B + B % 2, N, C)


@pytest.mark.parametrize("device,backend,dtype,shape", backend_params())
def test_matches_float64(device, backend, dtype, shape, gen):
    B, N, C = _even(shape)
    x = rand(B, N, C, dtype=dtype, device=device, gen=gen)
    y = rand(B, N, C, dtype=dtype, device=device, gen=gen)
    y_before = y.clone()
    cache = poisoned(B // 2, N, C, dtype=dtype, device=device)
    (ref_x, mag_x), (ref_c, mag_c) = _reference(x, y)

    out = ops.cfg_mean_store_(x, y, cache, backend=backend)

    assert out is x
    assert_close(x, ref_x, mag_x, dtype, "x")
    assert_close(cache, ref_c, mag_c, dtype, "cache")
    assert torch.equal(y, y_before), "y is read-only"


@pytest.mark.parametrize("device,backend,dtype,shape", backend_params(dtypes=[torch.float32], shapes=[(4, 5, 72)], interpreter_shapes=[(4, 5, 72)]))
def test_noncontiguous_y_is_accepted(device, backend, dtype, shape, gen):
    """A y taken with .chunk along C from a wider tensor, and one transposed."""
    B, N, C = shape
    for y in (rand(B, N, 2 * C, device=device, gen=gen).chunk(2, dim=2)[1],
              rand(B, C, N, device=device, gen=gen).transpose(1, 2)):
        assert not y.is_contiguous()
        x = rand(B, N, C, device=device, gen=gen)
        cache = poisoned(B // 2, N, C, device=device)
        (ref_x, mag_x), (ref_c, mag_c) = _reference(x, y)
        ops.cfg_mean_store_(x, y, cache, backend=backend)
        assert_close(x, ref_x, mag_x, dtype, "x")
        assert_close(cache, ref_c, mag_c, dtype, "cache")


@pytest.mark.parametrize("device,backend,dtype,shape", backend_params(shapes=[(2, 3, 72)], interpreter_shapes=[(2, 3, 72)]))
def test_mean_of_large_values_does_not_overflow(device, backend, dtype, shape):
    """The mean of two values near the largest finite one is finite (0.5 * a + 0.5 * b, not (a + b) / 2)."""
    B, N, C = shape
    big = torch.finfo(dtype).max
    y = torch.full((B, N, C), big, dtype=dtype, device=device)
    y[1] = big * 0.75
    y[:, :, 1::2] *= -1
    x = -y.clone()
    cache = poisoned(B // 2, N, C, dtype=dtype, device=device)
    (ref_x, mag_x), (ref_c, mag_c) = _reference(x, y)
    ops.cfg_mean_store_(x, y, cache, backend=backend)
    assert torch.equal(x, torch.zeros_like(x))
    assert_close(cache, ref_c, mag_c, dtype, "cache")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter (numpy)
@pytest.mark.parametrize("backend", cpu_backend_params())
def test_nan_and_inf_propagate(backend, gen):
    x, y = rand(2, 3, 8, gen=gen), rand(2, 3, 8, gen=gen)
    y[0, 0, 0], y[1, 1, 1], y[0, 2, 3], y[1, 2, 3], x[0, 1, 4] = float("nan"), float("inf"), float("inf"), float("-inf"), float("nan")
    (ref_x, _), (ref_c, _) = _reference(x, y)
    cache = torch.zeros(1, 3, 8)
    ops.cfg_mean_store_(x, y, cache, backend=backend)
    for got, ref in ((f64(x), ref_x), (f64(cache), ref_c)):
        assert torch.equal(got.isnan(), ref.isnan())
        assert torch.equal(got[got.isinf()], ref[ref.isinf()])


def test_empty_tensors_are_a_no_op():
    for B, N in ((0, 3), (2, 0)):
        x = torch.empty(B, N, 8)
        assert ops.cfg_mean_store_(x, torch.empty(B, N, 8), torch.empty(B // 2, N, 8)) is x


# ---------------------------------------------------------------------------------------- bad input


def _args(gen, B=4, N=3, C=8):
    return rand(B, N, C, gen=gen), rand(B, N, C, gen=gen), torch.empty(B // 2, N, C)


BAD = {
    "x rank": (lambda x, y, c: (x[0], y[0], c), "'x' must be a 3-D \\[B, N, C\\] tensor, got shape \\[3, 8\\]"),
    "x dtype": (lambda x, y, c: (x.double(), y.double(), c.double()), "'x' must be float32, float16 or bfloat16"),
    "x non-contiguous": (lambda x, y, c: (x.transpose(1, 2).contiguous().transpose(1, 2), y, c), "'x' is written in place and must be contiguous"),
    "odd batch": (lambda x, y, c: (x[:3], y[:3], c[:1]), "the batch of 'x' must be even"),
    "y shape": (lambda x, y, c: (x, y[:2], c), "'y' must have the shape of 'x', \\[4, 3, 8\\], got \\[2, 3, 8\\]"),
    "y dtype": (lambda x, y, c: (x, y.bfloat16(), c), "'y' has dtype torch.bfloat16 but 'x' has dtype torch.float32"),
    "y device": (lambda x, y, c: (x, y.to("meta"), c), "'y' is on meta but 'x' is on cpu"),
    "y not a tensor": (lambda x, y, c: (x, 1.0, c), "'y' must be a torch.Tensor"),
    "cache full batch": (lambda x, y, c: (x, y, torch.empty_like(x)), "'cache' must have shape \\[B/2, N, C\\] = \\[2, 3, 8\\] for 'x' of shape \\[4, 3, 8\\], got \\[4, 3, 8\\]"),
    "cache tokens": (lambda x, y, c: (x, y, c[:, :2]), "'cache' must have shape \\[B/2, N, C\\]"),
    "cache rank": (lambda x, y, c: (x, y, c[0]), "'cache' must have shape \\[B/2, N, C\\]"),
    "cache dtype": (lambda x, y, c: (x, y, c.half()), "'cache' has dtype torch.float16 but 'x' has dtype torch.float32"),
    "cache device": (lambda x, y, c: (x, y, c.to("meta")), "'cache' is on meta but 'x' is on cpu"),
    "cache non-contiguous": (lambda x, y, c: (x, y, torch.empty(3, 2, 8).transpose(0, 1)), "'cache' is written in place and must be contiguous"),
    "cache not a tensor": (lambda x, y, c: (x, y, None), "'cache' must be a torch.Tensor"),
    "y is x": (lambda x, y, c: (x, x, c), "'x' must not share memory with 'y'"),
    "cache in x": (lambda x, y, c: (x, y, x[2:]), "'cache' must not share memory with 'x'"),
    "cache in y": (lambda x, y, c: (x, y, y[:2]), "'cache' must not share memory with 'y'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_rejected_before_any_kernel(case, gen):
    make, match = BAD[case]
    x, y, c = make(*_args(gen))
    before = x.clone() if isinstance(x, torch.Tensor) and x.device.type != "meta" else None
    with pytest.raises(ValueError, match=match):
        ops.cfg_mean_store_(x, y, c)
    if before is not None:
        assert torch.equal(x, before), "x was modified although the call was rejected"


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (tensors on two devices)")
def test_cuda_device_mismatch_is_rejected(gen):
    x, y, c = _args(gen)
    with pytest.raises(ValueError, match="'cache' is on cpu but 'x' is on cuda"):
        ops.cfg_mean_store_(x.cuda(), y.cuda(), c)


# ------------------------------------------------------------------------ autograd, opcheck, compile


def test_torch_backend_is_differentiable(gen):
    """With an input that requires grad the differentiable torch backend runs (d x / d y = 1)."""
    y = rand(2, 3, 8, gen=gen).requires_grad_()
    x = rand(2, 3, 8, gen=gen) * 1
    cache = torch.empty(1, 3, 8)
    ops.cfg_mean_store_(x, y, cache)
    (x.sum() + 10 * cache.sum()).backward()
    assert torch.equal(y.grad, torch.full_like(y, 6.0))
    for backend in set(ops.available_backends("cpu")) - {"torch"}:
        with pytest.raises(ValueError, match="not differentiable"):
            ops.cfg_mean_store_(x.detach().clone(), y, cache.detach(), backend=backend)


@needs_extension
def test_opcheck():
    g = torch.Generator().manual_seed(0)
    x, y = rand(4, 3, 5, gen=g), rand(4, 3, 5, gen=g)
    torch.library.opcheck(torch.ops.l2c.cfg_mean_store_.default, (x, y, torch.empty(2, 3, 5)))


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="Triton kernels are checked on CPU under the interpreter")
def test_opcheck_triton():
    g = torch.Generator().manual_seed(0)
    x, y = rand(4, 3, 5, gen=g), rand(4, 3, 5, gen=g)
    ops._triton()
    torch.library.opcheck(torch.ops.l2c_triton.cfg_mean_store_.default, (x, y, torch.empty(2, 3, 5)))


@pytest.mark.parametrize("backend", compile_backend_params())
def test_torch_compile_fullgraph(backend, first_use, gen):
    """The public wrapper traces without graph breaks, also as the first use of the op in the process."""
    def step(x, y, cache):
        ops.cfg_mean_store_(x, y * 2, cache, backend=backend)
        return x + 1

    x, y = rand(4, 3, 72, gen=gen), rand(4, 3, 72, gen=gen)
    xe, ce = x.clone(), torch.empty(2, 3, 72)
    want = step(xe, y, ce)
    cache = poisoned(2, 3, 72)
    got = compiled(step)(x, y, cache)
    assert torch.equal(got, want) and torch.equal(x, xe) and torch.equal(cache, ce)
