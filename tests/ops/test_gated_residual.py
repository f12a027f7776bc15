"""gated_residual_: x += gate[:, None, :] * y (x += y without gate), cache <- y, on every backend."""
from __future__ import annotations

import pytest
import torch

from l2c_kernels import ops

from .conftest import (HAS_CUDA, TRITON_INTERPRETED, assert_close, backend_params, compile_backend_params, compiled,
                       f64, needs_extension, poisoned, rand)

VARIANTS = ["gate+cache", "gate", "cache", "plain"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("device,backend,dtype,shape", backend_params())
def test_matches_float64(device, backend, dtype, shape, variant, gen):
    B, N, C = shape
    x = rand(B, N, C, dtype=dtype, device=device, gen=gen)
    y = rand(B, N, C, dtype=dtype, device=device, gen=gen)
    gate = rand(B, C, dtype=dtype, device=device, gen=gen) if "gate" in variant else None
    cache = poisoned(B, N, C, dtype=dtype, device=device) if "cache" in variant else None
    x64, y64 = f64(x), f64(y)
    g64 = f64(gate)[:, None, :] if gate is not None else torch.ones((), dtype=torch.float64)
    ref, mag = x64 + g64 * y64, x64.abs() + (g64 * y64).abs()

    out = ops.gated_residual_(x, y, gate, cache, backend=backend)

    assert out is x
    assert_close(x, ref, mag, dtype, "x")
    if cache is not None:
        assert torch.equal(cache, y), "cache must be a bit copy of y"


@pytest.mark.parametrize("device,backend,dtype,shape", backend_params(dtypes=[torch.float32], shapes=[(2, 3, 72)], interpreter_shapes=[(2, 3, 72)]))
def test_nan_and_inf_propagate(device, backend, dtype, shape, gen):
    B, N, C = shape
    x, y = rand(B, N, C, gen=gen), rand(B, N, C, gen=gen)
    gate = rand(B, C, gen=gen)
    x[0, 0, 0], y[0, 1, 2], y[1, 2, 3], y[1, 0, 5], x[1, 0, 5] = float("nan"), float("inf"), float("-inf"), float("inf"), float("-inf")
    gate[1, 7] = float("nan")
    ref = f64(x) + f64(gate)[:, None] * f64(y)
    x, y, gate = (t.to(device) for t in (x, y, gate))
    ops.gated_residual_(x, y, gate, backend=backend)
    got = f64(x)
    assert torch.equal(got.isnan(), ref.isnan())
    assert torch.equal(got.isinf(), ref.isinf())
    assert torch.equal(got[got.isinf()], ref[ref.isinf()])


@pytest.mark.parametrize("device,backend,dtype,shape", backend_params(dtypes=[torch.float32], shapes=[(2, 5, 72)], interpreter_shapes=[(2, 5, 72)]))
def test_noncontiguous_gate_and_y_are_accepted(device, backend, dtype, shape, gen):
    """A gate taken with .chunk from a [B, 6C] embedding, and a transposed y."""
    B, N, C = shape
    emb = rand(B, 6 * C, device=device, gen=gen)
    gate = emb.chunk(6, dim=1)[2]
    assert not gate.is_contiguous()
    y = rand(B, C, N, device=device, gen=gen).transpose(1, 2)
    x = rand(B, N, C, device=device, gen=gen)
    ref = f64(x) + f64(gate)[:, None] * f64(y)
    cache = poisoned(B, N, C, device=device)
    ops.gated_residual_(x, y, gate, cache, backend=backend)
    assert_close(x, ref, ref.abs() + 1, dtype)
    assert torch.equal(cache, y)


def test_reuse_of_one_cache_for_both_cfg_halves(gen):
    """The runtime replays a [B/2] cache into each half of x: x[:h] and x[h:] are contiguous views."""
    x, cache = rand(4, 3, 72, gen=gen), rand(2, 3, 72, gen=gen)
    ref = f64(x) + f64(cache).repeat(2, 1, 1)
    ops.gated_residual_(x[:2], cache)
    ops.gated_residual_(x[2:], cache)
    assert_close(x, ref, ref.abs() + 1, torch.float32)


def test_empty_tensors_are_a_no_op():
    x = torch.empty(2, 0, 72)
    assert ops.gated_residual_(x, torch.empty(2, 0, 72), torch.randn(2, 72), torch.empty(2, 0, 72)) is x


# ---------------------------------------------------------------------------------------- bad input


def _args(gen, B=2, N=3, C=8, dtype=torch.float32):
    return rand(B, N, C, dtype=dtype, gen=gen), rand(B, N, C, dtype=dtype, gen=gen), rand(B, C, dtype=dtype, gen=gen), torch.empty(B, N, C, dtype=dtype)


def _overlapping(shape=(2, 3, 8), shift=8):
    """Two contiguous tensors of ``shape`` whose memory overlaps partially."""
    n = shape[0] * shape[1] * shape[2]
    buf = torch.randn(n + shift)
    return buf[:n].view(shape), buf[shift:].view(shape)


BAD = {
    "x rank": (lambda x, y, g, c: (x[0], y[0], None, None), "'x' must be a 3-D \\[B, N, C\\] tensor, got shape \\[3, 8\\]"),
    "x dtype": (lambda x, y, g, c: (x.double(), y.double(), None, None), "'x' must be float32, float16 or bfloat16"),
    "x non-contiguous": (lambda x, y, g, c: (x.transpose(0, 1), y.transpose(0, 1), None, None), "'x' is written in place and must be contiguous"),
    "y batch": (lambda x, y, g, c: (x, y[:1], None, None), "'y' must have the shape of 'x', \\[2, 3, 8\\], got \\[1, 3, 8\\]"),
    "y tokens": (lambda x, y, g, c: (x, y[:, :2], None, None), "'y' must have the shape of 'x'"),
    "y channels": (lambda x, y, g, c: (x, y[..., :7], None, None), "'y' must have the shape of 'x'"),
    "y dtype": (lambda x, y, g, c: (x, y.bfloat16(), None, None), "'y' has dtype torch.bfloat16 but 'x' has dtype torch.float32"),
    "y device": (lambda x, y, g, c: (x, y.to("meta"), None, None), "'y' is on meta but 'x' is on cpu"),
    "y not a tensor": (lambda x, y, g, c: (x, 1.0, None, None), "'y' must be a torch.Tensor"),
    "gate rank": (lambda x, y, g, c: (x, y, g[:, None, :], None), "'gate' must have shape \\[B, C\\] = \\[2, 8\\] to match 'x' of shape \\[2, 3, 8\\], got \\[2, 1, 8\\]"),
    "gate batch": (lambda x, y, g, c: (x, y, g[:1], None), "'gate' must have shape \\[B, C\\] = \\[2, 8\\]"),
    "gate channels": (lambda x, y, g, c: (x, y, torch.randn(2, 9), None), "'gate' must have shape \\[B, C\\] = \\[2, 8\\]"),
    "gate dtype": (lambda x, y, g, c: (x, y, g.half(), None), "'gate' has dtype torch.float16"),
    "gate device": (lambda x, y, g, c: (x, y, g.to("meta"), None), "'gate' is on meta"),
    "cache shape": (lambda x, y, g, c: (x, y, g, c[:1]), "'cache' must have the shape of 'x'"),
    "cache dtype": (lambda x, y, g, c: (x, y, g, c.bfloat16()), "'cache' has dtype torch.bfloat16"),
    "cache non-contiguous": (lambda x, y, g, c: (x, y, g, torch.empty(3, 2, 8).transpose(0, 1)), "'cache' is written in place and must be contiguous"),
    "y is x": (lambda x, y, g, c: (x, x, g, None), "'x' must not share memory with 'y'"),
    "y overlaps x": (lambda x, y, g, c: (*_overlapping(), None, None), "'x' must not share memory with 'y'"),
    "gate overlaps x": (lambda x, y, g, c: (x, y, x.view(-1)[:16].view(2, 8), None), "'x' must not share memory with 'gate'"),
    "cache is x": (lambda x, y, g, c: (x, y, g, x), "'cache' must not share memory with 'x'"),
    "cache is y": (lambda x, y, g, c: (x, y, g, y), "'cache' must not share memory with 'y'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_rejected_before_any_kernel(case, gen):
    make, match = BAD[case]
    x, y, g, c = make(*_args(gen))
    before = x.clone() if isinstance(x, torch.Tensor) and x.device.type != "meta" else None
    with pytest.raises(ValueError, match=match):
        ops.gated_residual_(x, y, g, c)
    if before is not None:
        assert torch.equal(x, before), "x was modified although the call was rejected"


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (tensors on two devices)")
def test_cuda_device_mismatch_is_rejected(gen):
    x, y, g, c = _args(gen)
    with pytest.raises(ValueError, match="'y' is on cuda"):
        ops.gated_residual_(x, y.cuda())


# ------------------------------------------------------------------------ autograd, opcheck, compile


def test_torch_backend_is_differentiable(gen):
    """With inputs that require grad the differentiable torch backend runs."""
    x0, y, gate = rand(2, 3, 8, gen=gen), rand(2, 3, 8, gen=gen).requires_grad_(), rand(2, 8, gen=gen).requires_grad_()
    x = x0.clone().requires_grad_()
    h = x * 1  # in place on a non-leaf
    cache = torch.empty(2, 3, 8)
    ops.gated_residual_(h, y, gate, cache)
    (h.sum() + 10 * cache.sum()).backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    torch.testing.assert_close(y.grad, gate.detach()[:, None, :].expand(2, 3, 8) + 10)
    torch.testing.assert_close(gate.grad, y.detach().sum(dim=1))
    for backend in set(ops.available_backends("cpu")) - {"torch"}:
        with pytest.raises(ValueError, match="not differentiable"):
            ops.gated_residual_(x0.clone(), y, gate, backend=backend)


def _opcheck_args():
    g = torch.Generator().manual_seed(0)
    x, y, gate = rand(2, 3, 5, gen=g), rand(2, 3, 5, gen=g), rand(2, 5, gen=g)
    return [(x, y, gate, torch.empty(2, 3, 5)), (x, y, None, None), (x, y, gate, None), (x, y, None, torch.empty(2, 3, 5))]


@needs_extension
def test_opcheck():
    for args in _opcheck_args():
        torch.library.opcheck(torch.ops.l2c.gated_residual_.default, args)


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="Triton kernels are checked on CPU under the interpreter")
def test_opcheck_triton():
    ops._triton()
    for args in _opcheck_args()[:2]:
        torch.library.opcheck(torch.ops.l2c_triton.gated_residual_.default, args)


@pytest.mark.parametrize("backend", compile_backend_params())
def test_torch_compile_fullgraph(backend, first_use, gen):
    """The wrapper traces without graph breaks (also as the first use of the op in the process), with
    the gate chunked from an embedding inside the graph, storing and then reusing a cache."""
    def block(x, y, emb, cache):
        gate = emb.chunk(6, dim=1)[2]
        ops.gated_residual_(x, y * 2, gate, cache, backend=backend)
        ops.gated_residual_(x, cache, gate, backend=backend)
        return x + 1

    x, y, emb = rand(2, 5, 72, gen=gen), rand(2, 5, 72, gen=gen), rand(2, 6 * 72, gen=gen)
    xe, ce = x.clone(), torch.empty(2, 5, 72)
    want = block(xe, y, emb, ce)
    cache = poisoned(2, 5, 72)
    got = compiled(block)(x, y, emb, cache)
    assert torch.equal(got, want) and torch.equal(x, xe) and torch.equal(cache, ce)
