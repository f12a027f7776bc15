"""residual_delta_store_ (cache <- out - inp) and residual_apply_ (out <- inp + cache), on every backend.

Both are elementwise over tensors of any one shape, and their destination may be the very same
tensor as one or both inputs.
"""
from __future__ import annotations

import pytest
import torch

from l2c_kernels import ops

from .conftest import (HAS_CUDA, TRITON_INTERPRETED, assert_close, backend_params, compile_backend_params, compiled,
                       cpu_backend_params, f64, needs_extension, poisoned, rand)

# op name -> (call(dst, a, b, backend), float64 result of a and b, argument names (dst, a, b))
OPS = {
    "residual_delta_store_": (lambda d, a, b, backend=None: ops.residual_delta_store_(d, a, b, backend=backend),
                              lambda a, b: a - b, ("cache", "out", "inp")),
    "residual_apply_": (lambda d, a, b, backend=None: ops.residual_apply_(d, a, b, backend=backend),
                        lambda a, b: a + b, ("out", "inp", "cache")),
}
OP_NAMES = list(OPS)


def _expect(op, a, b):
    """float64 result and the magnitude of its terms."""
    a64, b64 = f64(a), f64(b)
    return OPS[op][1](a64, b64), a64.abs() + b64.abs()


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("device,backend,dtype,shape", backend_params())
def test_matches_float64(device, backend, dtype, shape, op, gen):
    a = rand(*shape, dtype=dtype, device=device, gen=gen)
    b = rand(*shape, dtype=dtype, device=device, gen=gen)
    a0, b0 = a.clone(), b.clone()
    dst = poisoned(*shape, dtype=dtype, device=device)
    ref, mag = _expect(op, a, b)

    got = OPS[op][0](dst, a, b, backend=backend)

    assert got is dst
    assert_close(dst, ref, mag, dtype, OPS[op][2][0])
    assert torch.equal(a, a0) and torch.equal(b, b0), "the inputs are read-only"


ALIASES = ["dst is a", "dst is b", "dst is a and b"]


@pytest.mark.parametrize("alias", ALIASES)
@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("device,backend,dtype,shape", backend_params(shapes=[(3, 257, 72), (2, 1, 1153)], interpreter_shapes=[(3, 5, 72)]))
def test_destination_may_be_an_input(device, backend, dtype, shape, op, alias, gen):
    """In place: the destination is the very same tensor as one input, or as both."""
    a = rand(*shape, dtype=dtype, device=device, gen=gen)
    b = a if alias == "dst is a and b" else rand(*shape, dtype=dtype, device=device, gen=gen)
    ref, mag = _expect(op, a, b)
    dst = b if alias == "dst is b" else a
    got = OPS[op][0](dst, a, b, backend=backend)
    assert got is dst
    assert_close(dst, ref, mag, dtype, alias)


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("backend", cpu_backend_params())
def test_any_shape(backend, op, gen):
    for shape in [(), (7,), (2, 3, 4, 5)]:
        a, b = rand(*shape, gen=gen), rand(*shape, gen=gen)
        dst = poisoned(*shape)
        ref, mag = _expect(op, a, b)
        assert OPS[op][0](dst, a, b, backend=backend) is dst
        assert_close(dst, ref, mag, torch.float32, str(shape))


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("backend", cpu_backend_params())
def test_noncontiguous_inputs_are_accepted(backend, op, gen):
    """A read-only input may be any strided view, even one of the destination's own memory (it is
    copied before the destination is written)."""
    B, N, C = 2, 6, 6
    dst = rand(B, N, C, gen=gen)
    b = rand(B, 2 * N, C, gen=gen)[:, ::2]
    a = dst.transpose(1, 2)
    assert not a.is_contiguous() and not b.is_contiguous()
    ref, mag = _expect(op, a, b)
    OPS[op][0](dst, a, b, backend=backend)
    assert_close(dst, ref, mag, torch.float32)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter (numpy)
@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("backend", cpu_backend_params())
def test_nan_and_inf_propagate(backend, op, gen):
    a, b = rand(2, 3, 8, gen=gen), rand(2, 3, 8, gen=gen)
    a[0, 0, 0], b[0, 1, 1], a[1, 2, 3], b[1, 2, 3], a[1, 0, 0], b[1, 0, 0] = (
        float("nan"), float("inf"), float("inf"), float("-inf"), float("-inf"), float("-inf"))
    ref, _ = _expect(op, a, b)
    dst = torch.zeros(2, 3, 8)
    OPS[op][0](dst, a, b, backend=backend)
    got = f64(dst)
    assert torch.equal(got.isnan(), ref.isnan())
    assert torch.equal(got[got.isinf()], ref[ref.isinf()])


@pytest.mark.parametrize("op", OP_NAMES)
def test_empty_tensors_are_a_no_op(op):
    d = torch.empty(2, 0, 8)
    assert OPS[op][0](d, torch.empty(2, 0, 8), torch.empty(2, 0, 8)) is d


def test_delta_then_apply_replays_the_block(gen):
    """What the runtime does: store a block's residual at one step, add it to a new input later."""
    inp, out, later = (rand(2, 5, 72, gen=gen) for _ in range(3))
    delta = ops.residual_delta_store_(torch.empty_like(out), out, inp)
    replay = ops.residual_apply_(torch.empty_like(later), later, delta)
    ref = f64(later) + (f64(out) - f64(inp))
    assert_close(replay, ref, f64(later).abs() + f64(out).abs() + f64(inp).abs(), torch.float32)


# ---------------------------------------------------------------------------------------- bad input


def _overlapping(shape=(2, 3, 8), shift=8):
    """Two contiguous tensors of ``shape`` whose memory overlaps partially."""
    n = shape[0] * shape[1] * shape[2]
    buf = torch.randn(n + shift)
    return buf[:n].view(shape), buf[shift:].view(shape)


def _bad_cases(op):
    d, a, b = OPS[op][2]
    cases = {
        f"{d} dtype": (lambda D, A, B: (D.double(), A.double(), B.double()), f"'{d}' must be float32, float16 or bfloat16"),
        f"{d} non-contiguous": (lambda D, A, B: (D.transpose(1, 2), A.transpose(1, 2), B.transpose(1, 2)), f"'{d}' is written in place and must be contiguous"),
        f"{d} not a tensor": (lambda D, A, B: (None, A, B), f"'{d}' must be a torch.Tensor"),
        f"{a} shape": (lambda D, A, B: (D, A[:1], B), f"'{a}' must have the shape of '{d}', \\[2, 3, 8\\], got \\[1, 3, 8\\]"),
        f"{b} shape": (lambda D, A, B: (D, A, B[..., :7]), f"'{b}' must have the shape of '{d}', \\[2, 3, 8\\], got \\[2, 3, 7\\]"),
        f"{a} dtype": (lambda D, A, B: (D, A.bfloat16(), B), f"'{a}' has dtype torch.bfloat16 but '{d}' has dtype torch.float32"),
        f"{b} dtype": (lambda D, A, B: (D, A, B.half()), f"'{b}' has dtype torch.float16 but '{d}' has dtype torch.float32"),
        f"{a} device": (lambda D, A, B: (D, A.to("meta"), B), f"'{a}' is on meta but '{d}' is on cpu"),
        f"{b} device": (lambda D, A, B: (D, A, B.to("meta")), f"'{b}' is on meta but '{d}' is on cpu"),
        f"{b} not a tensor": (lambda D, A, B: (D, A, 0.0), f"'{b}' must be a torch.Tensor"),
        f"{a} overlaps {d}": (lambda D, A, B: (*_overlapping(), B), f"'{d}' partially overlaps '{a}'"),
        f"{b} overlaps {d}": (lambda D, A, B: (lambda d_, b_: (d_, A, b_))(*_overlapping()), f"'{d}' partially overlaps '{b}'"),
    }
    return cases


BAD = [(op, case) for op in OP_NAMES for case in _bad_cases(op)]


@pytest.mark.parametrize("op,case", BAD, ids=[f"{op}-{case}" for op, case in BAD])
def test_bad_input_is_rejected_before_any_kernel(op, case, gen):
    make, match = _bad_cases(op)[case]
    d, a, b = make(rand(2, 3, 8, gen=gen), rand(2, 3, 8, gen=gen), rand(2, 3, 8, gen=gen))
    before = d.clone() if isinstance(d, torch.Tensor) and d.device.type != "meta" else None
    with pytest.raises(ValueError, match=match):
        OPS[op][0](d, a, b)
    if before is not None:
        assert torch.equal(d, before), "the destination was modified although the call was rejected"


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (tensors on two devices)")
@pytest.mark.parametrize("op", OP_NAMES)
def test_cuda_device_mismatch_is_rejected(op, gen):
    d, a, b = (rand(2, 3, 8, gen=gen) for _ in range(3))
    with pytest.raises(ValueError, match=f"'{OPS[op][2][1]}' is on cpu but '{OPS[op][2][0]}' is on cuda"):
        OPS[op][0](d.cuda(), a, b.cuda())


# ------------------------------------------------------------------------ autograd, opcheck, compile


@pytest.mark.parametrize("op", OP_NAMES)
def test_torch_backend_is_differentiable(op, gen):
    a = rand(2, 3, 8, gen=gen).requires_grad_()
    b = rand(2, 3, 8, gen=gen).requires_grad_()
    dst = OPS[op][0](torch.empty(2, 3, 8), a, b)
    (dst * 3).sum().backward()
    sign = -1.0 if op == "residual_delta_store_" else 1.0
    assert torch.equal(a.grad, torch.full_like(a, 3.0))
    assert torch.equal(b.grad, torch.full_like(b, 3.0 * sign))
    for backend in set(ops.available_backends("cpu")) - {"torch"}:
        with pytest.raises(ValueError, match="not differentiable"):
            OPS[op][0](torch.empty(2, 3, 8), a, b, backend=backend)


def _opcheck_args():
    g = torch.Generator().manual_seed(0)
    a, b = rand(2, 3, 5, gen=g), rand(2, 3, 5, gen=g)
    return [(torch.empty(2, 3, 5), a, b), (a.clone(), a, b), (rand(7, gen=g), rand(7, gen=g), rand(7, gen=g))]


@needs_extension
@pytest.mark.parametrize("op", OP_NAMES)
def test_opcheck(op):
    for args in _opcheck_args():
        torch.library.opcheck(getattr(torch.ops.l2c, op).default, args)


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="Triton kernels are checked on CPU under the interpreter")
@pytest.mark.parametrize("op", OP_NAMES)
def test_opcheck_triton(op):
    ops._triton()
    torch.library.opcheck(getattr(torch.ops.l2c_triton, op).default, _opcheck_args()[0])


@pytest.mark.parametrize("backend", compile_backend_params())
def test_torch_compile_fullgraph(backend, first_use, gen):
    """Both wrappers trace without graph breaks (also as the first use of the ops in the process),
    in place on a graph input and out of place into an intermediate."""
    def block(h, inp, cache):
        ops.residual_delta_store_(cache, h, inp, backend=backend)
        out = torch.empty_like(h)
        ops.residual_apply_(out, h * 2, cache, backend=backend)
        ops.residual_apply_(h, h, cache, backend=backend)
        return out

    h, inp = rand(2, 5, 72, gen=gen), rand(2, 5, 72, gen=gen)
    he, ce = h.clone(), torch.empty_like(h)
    want = block(he, inp, ce)
    cache = poisoned(2, 5, 72)
    got = compiled(block)(h, inp, cache)
    assert torch.equal(got, want) and torch.equal(h, he) and torch.equal(cache, ce)
