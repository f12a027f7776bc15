"""Every op over drawn shapes, strides and dtypes against the float64 reference (hypothesis).

The per-op files check chosen shapes; here hypothesis draws ``[B, N, C]`` (C from 1 to 200, so
vector tails and single columns come up), float32 or bfloat16, and for every read-only argument a
layout: contiguous, transposed, every other column of a wider tensor, an offset slice, or (per-sample
vectors) a ``.chunk`` of a ``[B, 3C]`` embedding. Arguments written in place are contiguous, as the
ops require. The bound is the one of the per-op tests (``conftest.assert_close``): ``TOL[dtype]``
times the float64 magnitude of the terms of each element.

The C++ and PyTorch backends get 200 examples per op. The Triton interpreter runs every program
instance in numpy (milliseconds each) and has no bfloat16 arithmetic, so it gets 25 float32
examples over all ops together; the compiled Triton kernels get the full count on a GPU machine.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l2c_kernels import ops

from .conftest import HAS_CUDA, assert_close, f64, poisoned, rand

MANY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])
INTERPRETED = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                              HealthCheck.function_scoped_fixture])

COMPILED_CPU = [b for b in ("cpp", "torch") if b in ops.available_backends("cpu")]
OPS = ["gated_residual_", "cfg_mean_store_", "residual_delta_store_", "residual_apply_", "forecast_residual_",
       "adaln_modulate"]

ACTIVATION_LAYOUTS = ["contiguous", "transposed", "every_other_column", "offset"]
VECTOR_LAYOUTS = ["contiguous", "chunk", "transposed"]


def activation(layout: str, B: int, N: int, C: int, dtype, g) -> torch.Tensor:
    if layout == "contiguous":
        return rand(B, N, C, dtype=dtype, gen=g)
    if layout == "transposed":
        return rand(B, C, N, dtype=dtype, gen=g).transpose(1, 2)
    if layout == "every_other_column":
        return rand(B, N, 2 * C, dtype=dtype, gen=g)[..., ::2]
    return rand(B, N + 1, C, dtype=dtype, gen=g)[:, 1:]  # offset storage


def vector(layout: str, B: int, C: int, dtype, g) -> torch.Tensor:
    if layout == "contiguous":
        return rand(B, C, dtype=dtype, gen=g)
    if layout == "chunk":
        return rand(B, 3 * C, dtype=dtype, gen=g).chunk(3, dim=1)[1]
    return rand(C, B, dtype=dtype, gen=g).t()


@st.composite
def cases(draw, dtypes=(torch.float32, torch.bfloat16)):
    return dict(B=draw(st.integers(1, 4)), N=draw(st.integers(1, 33)), C=draw(st.integers(1, 200)),
                dtype=draw(st.sampled_from(dtypes)), seed=draw(st.integers(0, 2 ** 31 - 1)),
                layouts=draw(st.lists(st.sampled_from(ACTIVATION_LAYOUTS), min_size=3, max_size=3)),
                vlayouts=draw(st.lists(st.sampled_from(VECTOR_LAYOUTS), min_size=2, max_size=2)),
                with_gate=draw(st.booleans()), with_cache=draw(st.booleans()), with_y2=draw(st.booleans()),
                coefficients=draw(st.lists(st.floats(-3, 3, allow_nan=False), min_size=3, max_size=3)),
                eps=draw(st.sampled_from([1e-6, 1e-5])))


def check(op: str, backend: str, c: dict) -> None:
    """Run ``op`` on ``backend`` for case ``c`` and compare with the float64 reference."""
    B, N, C, dtype = c["B"], c["N"], c["C"], c["dtype"]
    g = torch.Generator().manual_seed(c["seed"])
    la, lb, lc = c["layouts"]
    va, vb = c["vlayouts"]
    if op == "gated_residual_":
        x, y = rand(B, N, C, dtype=dtype, gen=g), activation(la, B, N, C, dtype, g)
        gate = vector(va, B, C, dtype, g) if c["with_gate"] else None
        cache = poisoned(B, N, C, dtype=dtype) if c["with_cache"] else None
        g64 = f64(gate)[:, None, :] if gate is not None else torch.ones((), dtype=torch.float64)
        ref, mag = f64(x) + g64 * f64(y), f64(x).abs() + (g64 * f64(y)).abs()
        assert ops.gated_residual_(x, y, gate, cache, backend=backend) is x
        assert_close(x, ref, mag, dtype, "x")
        if cache is not None:
            assert torch.equal(cache, y), "cache must be a bit copy of y"
    elif op == "cfg_mean_store_":
        B = 2 * ((B + 1) // 2)
        x, y = rand(B, N, C, dtype=dtype, gen=g), activation(la, B, N, C, dtype, g)
        cache = poisoned(B // 2, N, C, dtype=dtype)
        x64, y64 = f64(x), f64(y)
        ya, yb = y64[:B // 2], y64[B // 2:]
        ops.cfg_mean_store_(x, y, cache, backend=backend)
        assert_close(x, x64 + y64, x64.abs() + y64.abs(), dtype, "x")
        assert_close(cache, (ya + yb) / 2, (ya.abs() + yb.abs()) / 2, dtype, "cache")
    elif op == "residual_delta_store_":
        cache = poisoned(B, N, C, dtype=dtype)
        out, inp = activation(la, B, N, C, dtype, g), activation(lb, B, N, C, dtype, g)
        ops.residual_delta_store_(cache, out, inp, backend=backend)
        assert_close(cache, f64(out) - f64(inp), f64(out).abs() + f64(inp).abs(), dtype, "cache")
    elif op == "residual_apply_":
        out = poisoned(B, N, C, dtype=dtype)
        inp, cache = activation(la, B, N, C, dtype, g), activation(lb, B, N, C, dtype, g)
        ops.residual_apply_(out, inp, cache, backend=backend)
        assert_close(out, f64(inp) + f64(cache), f64(inp).abs() + f64(cache).abs(), dtype, "out")
    elif op == "forecast_residual_":
        x = rand(B, N, C, dtype=dtype, gen=g)
        y0, y1 = activation(la, B, N, C, dtype, g), activation(lb, B, N, C, dtype, g)
        y2 = activation(lc, B, N, C, dtype, g) if c["with_y2"] else None
        gate = vector(va, B, C, dtype, g) if c["with_gate"] else None
        c0, c1, c2 = c["coefficients"] if y2 is not None else c["coefficients"][:2] + [0.0]
        g64 = f64(gate)[:, None, :] if gate is not None else torch.ones((), dtype=torch.float64)
        terms = [c0 * f64(y0), c1 * f64(y1)] + ([c2 * f64(y2)] if y2 is not None else [])
        ref, mag = f64(x) + g64 * sum(terms), f64(x).abs() + g64.abs() * sum(t.abs() for t in terms)
        ops.forecast_residual_(x, y0, y1, y2, gate, c0, c1, c2, backend=backend)
        assert_close(x, ref, mag, dtype, "x")
    elif op == "adaln_modulate":
        x = activation(la, B, N, C, dtype, g)
        shift, scale = vector(va, B, C, dtype, g), vector(vb, B, C, dtype, g)
        before = [t.clone() for t in (x, shift, scale)]
        x64, sh, sc = f64(x), f64(shift)[:, None, :], f64(scale)[:, None, :]
        mean = x64.mean(-1, keepdim=True)
        rstd = 1 / torch.sqrt(((x64 - mean) ** 2).mean(-1, keepdim=True) + c["eps"])
        ref = (x64 - mean) * rstd * (1 + sc) + sh
        mag = (x64.abs() + mean.abs()) * rstd * (1 + sc.abs()) + sh.abs()
        # the mean and variance are sums of C terms accumulated in float32 (every backend, every dtype): the
        # mean's error is up to C u mean|x|, the variance's relative error up to C u (so rstd's C u / 2), with
        # u = 2^-24, on top of the elementwise rounding TOL covers
        u = C * 2.0 ** -24
        red = (u * x64.abs().mean(-1, keepdim=True) + u / 2 * (x64 - mean).abs()) * rstd * (1 + sc.abs())
        out = ops.adaln_modulate(x, shift, scale, c["eps"], backend=backend)
        assert out.shape == (B, N, C) and out.dtype == dtype and out.is_contiguous()
        assert_close(out, ref, mag, dtype, "out", reduction=red)
        assert all(torch.equal(a, b) for a, b in zip((x, shift, scale), before)), "the inputs are read-only"
    else:
        raise AssertionError(op)


@pytest.mark.parametrize("backend", COMPILED_CPU)
@pytest.mark.parametrize("op", OPS)
@MANY
@given(case=cases())
def test_op_matches_float64_over_shapes_strides_and_dtypes(op, backend, case):
    check(op, backend, case)


@pytest.mark.skipif("triton" not in ops.available_backends("cpu") or HAS_CUDA,
                    reason="Triton interpreter on CPU tensors (on a GPU the compiled kernels are tested)")
@INTERPRETED
@given(op=st.sampled_from(OPS), case=cases(dtypes=(torch.float32,)))
def test_triton_interpreter_matches_float64(op, case):
    check(op, "triton", dict(case, B=min(case["B"], 2), N=min(case["N"], 9)))
