"""forecast_residual_: x += gate[:, None, :] * (cache + a * diff + b * diff2), on every backend."""
from __future__ import annotations

import pytest
import torch

from l2c_kernels import ops

from .conftest import (HAS_CUDA, TRITON_INTERPRETED, assert_close, backend_params, compile_backend_params, compiled,
                       f64, needs_extension, poisoned, rand)

VARIANTS = ["gate+diff2", "gate", "diff2", "plain"]
COEFS = [(2.0, 0.0), (-0.75, 1.5)]


@pytest.mark.parametrize("a,b", COEFS, ids=["a=2", "a=-0.75,b=1.5"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("device,backend,dtype,shape", backend_params())
def test_matches_float64(device, backend, dtype, shape, variant, a, b, gen):
    B, N, C = shape
    x, cache, diff = (rand(B, N, C, dtype=dtype, device=device, gen=gen) for _ in range(3))
    diff2 = rand(B, N, C, dtype=dtype, device=device, gen=gen) if "diff2" in variant else None
    gate = rand(B, C, dtype=dtype, device=device, gen=gen) if "gate" in variant else None
    inputs = [t.clone() for t in (cache, diff) + ((diff2,) if diff2 is not None else ())]
    g64 = f64(gate)[:, None, :] if gate is not None else torch.ones((), dtype=torch.float64)
    terms = [f64(cache), a * f64(diff)] + ([b * f64(diff2)] if diff2 is not None else [])
    ref = f64(x) + g64 * sum(terms)
    mag = f64(x).abs() + g64.abs() * sum(t.abs() for t in terms)

    out = ops.forecast_residual_(x, cache, diff, diff2, gate, a, b, backend=backend)

    assert out is x
    assert_close(x, ref, mag, dtype, "x")
    for before, after in zip(inputs, (cache, diff, diff2)):
        assert torch.equal(before, after), "the cached state is read-only"


@pytest.mark.parametrize("device,backend,dtype,shape", backend_params(dtypes=[torch.float32], shapes=[(2, 3, 72)],
                                                                      interpreter_shapes=[(2, 3, 72)]))
def test_matches_the_unfused_ops(device, backend, dtype, shape, gen):
    """The forecast the runtime applied before this op: one gated add per term."""
    B, N, C = shape
    x, cache, diff, diff2 = (rand(B, N, C, device=device, gen=gen) for _ in range(4))
    gate = rand(B, C, device=device, gen=gen)
    want = x.clone()
    ops.gated_residual_(want, cache, gate, backend="torch")
    ops.gated_residual_(want, diff, gate * 1.5, backend="torch")
    ops.gated_residual_(want, diff2, gate * -0.5, backend="torch")
    ops.forecast_residual_(x, cache, diff, diff2, gate, 1.5, -0.5, backend=backend)
    torch.testing.assert_close(x, want, rtol=1e-6, atol=1e-6)


def test_nan_in_the_state_propagates(gen):
    x, cache, diff = (rand(2, 3, 8, gen=gen) for _ in range(3))
    diff[1, 2, 3] = float("nan")
    ops.forecast_residual_(x, cache, diff, None, None, 1.0, 0.0)
    assert x.isnan().sum() == 1 and x[1, 2, 3].isnan()


def test_empty_tensors_are_a_no_op():
    x = torch.empty(2, 0, 8)
    assert ops.forecast_residual_(x, torch.empty(2, 0, 8), torch.empty(2, 0, 8), None, torch.randn(2, 8), 1.0, 0.0) is x


# ---------------------------------------------------------------------------------------- bad input


def _args(gen, B=2, N=3, C=8):
    return [rand(B, N, C, gen=gen) for _ in range(4)] + [rand(B, C, gen=gen)]


BAD = {
    "x rank": (lambda x, c, d, d2, g: (x[0], c[0], d[0], None, None, 1.0, 0.0), "'x' must be a 3-D"),
    "cache shape": (lambda x, c, d, d2, g: (x, c[:1], d, None, None, 1.0, 0.0), "'cache' must have the shape of 'x'"),
    "diff dtype": (lambda x, c, d, d2, g: (x, c, d.bfloat16(), None, None, 1.0, 0.0), "'diff' has dtype torch.bfloat16"),
    "diff2 shape": (lambda x, c, d, d2, g: (x, c, d, d2[..., :7], None, 1.0, 0.0), "'diff2' must have the shape of 'x'"),
    "gate shape": (lambda x, c, d, d2, g: (x, c, d, None, g[:1], 1.0, 0.0), "'gate' must have shape \\[B, C\\]"),
    "a not finite": (lambda x, c, d, d2, g: (x, c, d, None, None, float("nan"), 0.0), "'a' must be a finite float"),
    "b a tensor": (lambda x, c, d, d2, g: (x, c, d, d2, None, 1.0, torch.tensor(1.0)), "'b' must be a finite float"),
    "cache is x": (lambda x, c, d, d2, g: (x, x, d, None, None, 1.0, 0.0), "'x' must not share memory with 'cache'"),
    "diff is x": (lambda x, c, d, d2, g: (x, c, x, None, None, 1.0, 0.0), "'x' must not share memory with 'diff'"),
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
    cache, diff = rand(2, 3, 8, gen=gen).requires_grad_(), rand(2, 3, 8, gen=gen).requires_grad_()
    gate = rand(2, 8, gen=gen).requires_grad_()
    h = rand(2, 3, 8, gen=gen).requires_grad_() * 1
    ops.forecast_residual_(h, cache, diff, None, gate, 2.0, 0.0)
    h.sum().backward()
    torch.testing.assert_close(diff.grad, 2 * gate.detach()[:, None, :].expand(2, 3, 8))
    torch.testing.assert_close(gate.grad, (cache + 2 * diff).detach().sum(dim=1))


def _opcheck_args():
    g = torch.Generator().manual_seed(0)
    x, c, d, d2 = (rand(2, 3, 5, gen=g) for _ in range(4))
    gate = rand(2, 5, gen=g)
    return [(x, c, d, d2, gate, 1.5, -0.5), (x, c, d, None, None, 2.0, 0.0), (x, c, d, None, gate, 1.0, 0.0)]


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
    def block(x, cache, diff, diff2, emb):
        gate = emb.chunk(6, dim=1)[2]
        ops.forecast_residual_(x, cache, diff, diff2, gate, 1.5, -0.5, backend=backend)
        return x + 1

    x, c, d, d2 = (rand(2, 5, 72, gen=gen) for _ in range(4))
    emb = rand(2, 6 * 72, gen=gen)
    xe = x.clone()
    want = block(xe, c, d, d2, emb)
    got = compiled(block)(x, c, d, d2, emb)
    assert torch.equal(got, want) and torch.equal(x, xe)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_matches_cpu(gen):
    args = _opcheck_args()[0]
    want = args[0].clone()
    ops.forecast_residual_(want, *args[1:], backend="torch")
    got = args[0].cuda()
    ops.forecast_residual_(got, *[t.cuda() if isinstance(t, torch.Tensor) else t for t in args[1:]])
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6)
