"""forecast_residual_: x += gate[:, None, :] * (c0 * y0 + c1 * y1 + c2 * y2), on every backend."""
from __future__ import annotations

import pytest
import torch

from l2c_kernels import ops

from .conftest import (HAS_CUDA, TRITON_INTERPRETED, assert_close, backend_params, compile_backend_params, compiled,
                       f64, needs_extension, rand)

VARIANTS = ["gate+y2", "gate", "y2", "plain"]
#: linear extrapolation one step ahead, quadratic one step ahead, quadratic to an uneven step
COEFS = [(2.0, -1.0, 0.0), (3.0, -3.0, 1.0), (0.375, 0.75, -0.125)]


@pytest.mark.parametrize("c", COEFS, ids=["linear", "quadratic", "uneven"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("device,backend,dtype,shape", backend_params())
def test_matches_float64(device, backend, dtype, shape, variant, c, gen):
    B, N, C = shape
    x, y0, y1 = (rand(B, N, C, dtype=dtype, device=device, gen=gen) for _ in range(3))
    y2 = rand(B, N, C, dtype=dtype, device=device, gen=gen) if "y2" in variant else None
    gate = rand(B, C, dtype=dtype, device=device, gen=gen) if "gate" in variant else None
    inputs = [t.clone() for t in (y0, y1) + ((y2,) if y2 is not None else ())]
    g64 = f64(gate)[:, None, :] if gate is not None else torch.ones((), dtype=torch.float64)
    terms = [c[0] * f64(y0), c[1] * f64(y1)] + ([c[2] * f64(y2)] if y2 is not None else [])
    ref = f64(x) + g64 * sum(terms)
    mag = f64(x).abs() + g64.abs() * sum(t.abs() for t in terms)

    out = ops.forecast_residual_(x, y0, y1, y2, gate, *c, backend=backend)

    assert out is x
    assert_close(x, ref, mag, dtype, "x")
    for before, after in zip(inputs, (y0, y1, y2)):
        assert torch.equal(before, after), "the stored outputs are read-only"


@pytest.mark.parametrize("device,backend,dtype,shape", backend_params(dtypes=[torch.float32], shapes=[(2, 3, 72)],
                                                                      interpreter_shapes=[(2, 3, 72)]))
def test_extrapolates_a_parabola_exactly(device, backend, dtype, shape, gen):
    """Outputs sampled from p(t) = a + b t + c t^2 at t = 0, 2, 3; the weights for t = 5 give p(5)."""
    B, N, C = shape
    a, b, c = (rand(B, N, C, device=device, gen=gen) for _ in range(3))
    p = {t: a + b * t + c * t * t for t in (0, 2, 3, 5)}
    nodes = (3, 2, 0)
    w = []
    for j, sj in enumerate(nodes):
        wj = 1.0
        for m, sm in enumerate(nodes):
            if m != j:
                wj *= (5 - sm) / (sj - sm)
        w.append(wj)
    x = torch.zeros(B, N, C, device=device)
    ops.forecast_residual_(x, p[3], p[2], p[0], None, *w, backend=backend)
    torch.testing.assert_close(x, p[5], rtol=1e-5, atol=1e-4)


def test_nan_in_a_stored_output_propagates(gen):
    x, y0, y1 = (rand(2, 3, 8, gen=gen) for _ in range(3))
    y1[1, 2, 3] = float("nan")
    ops.forecast_residual_(x, y0, y1, None, None, 2.0, -1.0, 0.0)
    assert x.isnan().sum() == 1 and x[1, 2, 3].isnan()


def test_empty_tensors_are_a_no_op():
    x = torch.empty(2, 0, 8)
    assert ops.forecast_residual_(x, torch.empty(2, 0, 8), torch.empty(2, 0, 8), None, torch.randn(2, 8),
                                  2.0, -1.0, 0.0) is x


# ---------------------------------------------------------------------------------------- bad input


def _args(gen, B=2, N=3, C=8):
    return [rand(B, N, C, gen=gen) for _ in range(4)] + [rand(B, C, gen=gen)]


BAD = {
    "x rank": (lambda x, y0, y1, y2, g: (x[0], y0[0], y1[0], None, None, 2.0, -1.0, 0.0), "'x' must be a 3-D"),
    "y0 shape": (lambda x, y0, y1, y2, g: (x, y0[:1], y1, None, None, 2.0, -1.0, 0.0), "'y0' must have the shape of 'x'"),
    "y1 dtype": (lambda x, y0, y1, y2, g: (x, y0, y1.bfloat16(), None, None, 2.0, -1.0, 0.0), "'y1' has dtype torch.bfloat16"),
    "y2 shape": (lambda x, y0, y1, y2, g: (x, y0, y1, y2[..., :7], None, 3.0, -3.0, 1.0), "'y2' must have the shape of 'x'"),
    "gate shape": (lambda x, y0, y1, y2, g: (x, y0, y1, None, g[:1], 2.0, -1.0, 0.0), "'gate' must have shape \\[B, C\\]"),
    "c0 not finite": (lambda x, y0, y1, y2, g: (x, y0, y1, None, None, float("nan"), -1.0, 0.0), "'c0' must be a finite float"),
    "c2 infinite": (lambda x, y0, y1, y2, g: (x, y0, y1, y2, None, 3.0, -3.0, float("inf")), "'c2' must be a finite float"),
    "c1 a tensor": (lambda x, y0, y1, y2, g: (x, y0, y1, y2, None, 3.0, torch.tensor(1.0), 1.0), "'c1' must be a finite float"),
    "y0 is x": (lambda x, y0, y1, y2, g: (x, x, y1, None, None, 2.0, -1.0, 0.0), "'x' must not share memory with 'y0'"),
    "y2 is x": (lambda x, y0, y1, y2, g: (x, y0, y1, x, None, 3.0, -3.0, 1.0), "'x' must not share memory with 'y2'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_rejected_before_any_kernel(case, gen):
    make, match = BAD[case]
    args = make(*_args(gen))
    before = args[0].clone()
    with pytest.raises(ValueError, match=match):
        ops.forecast_residual_(*args)
    assert torch.equal(args[0], before), "x was modified although the call was rejected"


# ------------------------------------------------------------------------ autograd, opcheck, compile


def test_torch_backend_is_differentiable(gen):
    y0, y1 = rand(2, 3, 8, gen=gen).requires_grad_(), rand(2, 3, 8, gen=gen).requires_grad_()
    gate = rand(2, 8, gen=gen).requires_grad_()
    h = rand(2, 3, 8, gen=gen).requires_grad_() * 1
    ops.forecast_residual_(h, y0, y1, None, gate, 2.0, -1.0, 0.0)
    h.sum().backward()
    torch.testing.assert_close(y1.grad, -gate.detach()[:, None, :].expand(2, 3, 8))
    torch.testing.assert_close(gate.grad, (2 * y0 - y1).detach().sum(dim=1))


def _opcheck_args():
    g = torch.Generator().manual_seed(0)
    x, y0, y1, y2 = (rand(2, 3, 5, gen=g) for _ in range(4))
    gate = rand(2, 5, gen=g)
    return [(x, y0, y1, y2, gate, 3.0, -3.0, 1.0), (x, y0, y1, None, None, 2.0, -1.0, 0.0),
            (x, y0, y1, None, gate, 2.0, -1.0, 0.0)]


@needs_extension
def test_opcheck():
    for args in _opcheck_args():
        torch.library.opcheck(torch.ops.l2c.forecast_residual_.default, args)


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="Triton kernels are checked on CPU under the interpreter")
def test_opcheck_triton():
    ops._triton()
    for args in _opcheck_args()[:2]:
        torch.library.opcheck(torch.ops.l2c_triton.forecast_residual_.default, args)


@pytest.mark.parametrize("backend", compile_backend_params())
def test_torch_compile_fullgraph(backend, first_use, gen):
    def block(x, y0, y1, y2, emb):
        gate = emb.chunk(6, dim=1)[2]
        ops.forecast_residual_(x, y0, y1, y2, gate, 3.0, -3.0, 1.0, backend=backend)
        return x + 1

    x, y0, y1, y2 = (rand(2, 5, 72, gen=gen) for _ in range(4))
    emb = rand(2, 6 * 72, gen=gen)
    xe = x.clone()
    want = block(xe, y0, y1, y2, emb)
    got = compiled(block)(x, y0, y1, y2, emb)
    assert torch.equal(got, want) and torch.equal(x, xe)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_matches_cpu():
    args = _opcheck_args()[0]
    want = args[0].clone()
    ops.forecast_residual_(want, *args[1:], backend="torch")
    got = args[0].cuda()
    ops.forecast_residual_(got, *[t.cuda() if isinstance(t, torch.Tensor) else t for t in args[1:]])
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6)
