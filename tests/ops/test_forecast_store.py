"""forecast_store_: x += gate * y; diff2 <- diff; diff <- y - cache; cache <- y, on every backend."""
from __future__ import annotations

import pytest
import torch

from l2c_kernels import ops

from .conftest import (HAS_CUDA, TRITON_INTERPRETED, assert_close, backend_params, compile_backend_params, compiled,
                       f64, needs_extension, rand)

VARIANTS = ["gate+diff2", "gate", "diff2", "plain"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("device,backend,dtype,shape", backend_params())
def test_matches_float64(device, backend, dtype, shape, variant, gen):
    B, N, C = shape
    x, y, cache, diff = (rand(B, N, C, dtype=dtype, device=device, gen=gen) for _ in range(4))
    diff2 = rand(B, N, C, dtype=dtype, device=device, gen=gen) if "diff2" in variant else None
    gate = rand(B, C, dtype=dtype, device=device, gen=gen) if "gate" in variant else None
    old_diff = diff.clone()
    g64 = f64(gate)[:, None, :] if gate is not None else torch.ones((), dtype=torch.float64)
    ref_x, mag_x = f64(x) + g64 * f64(y), f64(x).abs() + (g64 * f64(y)).abs()
    ref_d, mag_d = f64(y) - f64(cache), f64(y).abs() + f64(cache).abs()

    out = ops.forecast_store_(x, y, gate, cache, diff, diff2, backend=backend)

    assert out is x
    assert_close(x, ref_x, mag_x, dtype, "x")
    assert_close(diff, ref_d, mag_d, dtype, "diff")
    assert torch.equal(cache, y), "cache must be a bit copy of y"
    if diff2 is not None:
        assert torch.equal(diff2, old_diff), "diff2 must be a bit copy of the previous diff"


@pytest.mark.parametrize("device,backend,dtype,shape", backend_params(dtypes=[torch.float32], shapes=[(2, 3, 72)],
                                                                      interpreter_shapes=[(2, 3, 72)]))
def test_three_computations_give_newton_differences(device, backend, dtype, shape, gen):
    """After outputs y0, y1, y2: cache = y2, diff = y2 - y1, diff2 = y1 - y0 (the state a quadratic
    forecast reads), and x has every gated output added."""
    B, N, C = shape
    ys = [rand(B, N, C, device=device, gen=gen) for _ in range(3)]
    gate = rand(B, C, device=device, gen=gen)
    x = torch.zeros(B, N, C, device=device)
    cache, diff, diff2 = (torch.zeros(B, N, C, device=device) for _ in range(3))
    for y in ys:
        ops.forecast_store_(x, y, gate, cache, diff, diff2, backend=backend)
    assert torch.equal(cache, ys[2])
    torch.testing.assert_close(diff, ys[2] - ys[1])
    torch.testing.assert_close(diff2, ys[1] - ys[0])
    torch.testing.assert_close(x, gate[:, None, :] * (ys[0] + ys[1] + ys[2]))


def test_empty_tensors_are_a_no_op():
    x = torch.empty(2, 0, 8)
    e = [torch.empty(2, 0, 8) for _ in range(4)]
    assert ops.forecast_store_(x, e[0], None, e[1], e[2], e[3]) is x


# ---------------------------------------------------------------------------------------- bad input


def _args(gen, B=2, N=3, C=8):
    x, y, c, d, d2 = (rand(B, N, C, gen=gen) for _ in range(5))
    return x, y, rand(B, C, gen=gen), c, d, d2


BAD = {
    "y shape": (lambda x, y, g, c, d, d2: (x, y[:1], g, c, d, d2), "'y' must have the shape of 'x'"),
    "gate shape": (lambda x, y, g, c, d, d2: (x, y, g[:, :7], c, d, d2), "'gate' must have shape \\[B, C\\]"),
    "cache dtype": (lambda x, y, g, c, d, d2: (x, y, g, c.bfloat16(), d, d2), "'cache' has dtype torch.bfloat16"),
    "diff non-contiguous": (lambda x, y, g, c, d, d2: (x, y, g, c, torch.empty(3, 2, 8).transpose(0, 1), d2),
                            "'diff' is written in place and must be contiguous"),
    "diff2 shape": (lambda x, y, g, c, d, d2: (x, y, g, c, d, d2[:, :2]), "'diff2' must have the shape of 'x'"),
    "cache is y": (lambda x, y, g, c, d, d2: (x, y, g, y, d, d2), "'cache' must not share memory with 'y'"),
    "diff is cache": (lambda x, y, g, c, d, d2: (x, y, g, c, c, d2), "'cache' must not share memory with 'diff'"),
    "diff2 is diff": (lambda x, y, g, c, d, d2: (x, y, g, c, d, d), "'diff' must not share memory with 'diff2'"),
    "x is y": (lambda x, y, g, c, d, d2: (x, x, g, c, d, d2), "'x' must not share memory with 'y'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_rejected_before_any_kernel(case, gen):
    make, match = BAD[case]
    args = make(*_args(gen))
    before = [a.clone() for a in args if isinstance(a, torch.Tensor)]
    with pytest.raises(ValueError, match=match):
        ops.forecast_store_(*args)
    after = [a for a in args if isinstance(a, torch.Tensor)]
    assert all(torch.equal(p, q) for p, q in zip(before, after)), "an argument was modified although the call was rejected"


# ------------------------------------------------------------------------ autograd, opcheck, compile


def _opcheck_args():
    g = torch.Generator().manual_seed(0)
    x, y, c, d, d2 = (rand(2, 3, 5, gen=g) for _ in range(5))
    gate = rand(2, 5, gen=g)
    return [(x, y, gate, c, d, d2), (x, y, None, c, d, None), (x, y, gate, c, d, None)]


@needs_extension
def test_opcheck():
    for args in _opcheck_args():
        torch.library.opcheck(torch.ops.l2c.forecast_store_.default, args)


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="Triton kernels are checked on CPU under the interpreter")
def test_opcheck_triton():
    ops._triton()
    for args in _opcheck_args()[:2]:
        torch.library.opcheck(torch.ops.l2c_triton.forecast_store_.default, args)


@pytest.mark.parametrize("backend", compile_backend_params())
def test_torch_compile_fullgraph(backend, first_use, gen):
    def block(x, y, emb, cache, diff, diff2):
        gate = emb.chunk(6, dim=1)[2]
        ops.forecast_store_(x, y * 2, gate, cache, diff, diff2, backend=backend)
        ops.forecast_residual_(x, cache, diff, diff2, gate, 1.0, 0.5, backend=backend)
        return x + 1

    x, y, c, d, d2 = (rand(2, 5, 72, gen=gen) for _ in range(5))
    emb = rand(2, 6 * 72, gen=gen)
    state = [t.clone() for t in (x, c, d, d2)]
    want = block(state[0], y, emb, *state[1:])
    got = compiled(block)(x, y, emb, c, d, d2)
    assert torch.equal(got, want)
    assert all(torch.equal(p, q) for p, q in zip((x, c, d, d2), state))


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_matches_cpu(gen):
    args = _opcheck_args()[0]
    want = [t.clone() for t in args]
    ops.forecast_store_(*want, backend="torch")
    got = [t.cuda() for t in args]
    ops.forecast_store_(*got)
    for p, q in zip(got, want):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-6, atol=1e-6)
