"""Shared fixtures of the op tests: devices, backends, dtypes, tolerances, inputs.

Without a CUDA device the Triton kernels are tested on CPU tensors under the Triton interpreter:
``TRITON_INTERPRET=1`` is set here, before ``l2c_kernels.ops.triton`` is first imported (``triton.jit``
chooses the interpreter when a kernel is defined). The interpreter is slow (milliseconds per
program) and has no bfloat16 arithmetic, so it gets a few well-chosen shapes and float32 only.
"""
from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from l2c_kernels import ops  # noqa: E402
from l2c_kernels.ops import _backend  # noqa: E402

TRITON_INTERPRETED = not HAS_CUDA and "triton" in ops.available_backends("cpu")

HAS_EXTENSION = ops.HAS_EXTENSION
needs_extension = pytest.mark.skipif(not HAS_EXTENSION, reason="l2c_kernels._C (torch.ops.l2c) is not built")

#: Shapes [B, N, C] for the compiled backends: C in {1, 72, 1152, 1153}, N in {1, 257}.
SHAPES = [(2, 1, 1), (2, 257, 1), (2, 1, 72), (3, 257, 72), (2, 1, 1152), (2, 1, 1153), (2, 257, 1153)]
#: Shapes for the Triton interpreter: every C, row and column masks, N=257 where it stays cheap.
INTERPRETER_SHAPES = [(2, 257, 1), (3, 257, 72), (2, 1, 1152), (2, 1, 1153), (2, 5, 1153)]

#: Bound on |got - float64 reference| per unit of magnitude of the terms (see ``assert_close``).
TOL = {torch.float32: 2e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}

SKIP_INTERPRETER_BF16 = "the Triton interpreter has no bfloat16/float16 arithmetic (numpy); float32 only"


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])


def backend_params(dtypes=None, shapes=None, interpreter_shapes=None):
    """pytest params ``(device, backend, dtype, shape)`` for every backend available here."""
    params = []
    for device in devices():
        dts = dtypes or ([torch.float32, torch.bfloat16] + ([torch.float16] if device == "cuda" else []))
        for backend in ops.available_backends(device):
            interpreted = backend == "triton" and device == "cpu"
            for dtype in dts:
                marks = [pytest.mark.skip(reason=SKIP_INTERPRETER_BF16)] if interpreted and dtype != torch.float32 else []
                for shape in (interpreter_shapes or INTERPRETER_SHAPES) if interpreted else (shapes or SHAPES):
                    name = f"{device}-{backend}-{str(dtype).removeprefix('torch.')}-{'x'.join(map(str, shape))}"
                    params.append(pytest.param(device, backend, dtype, shape, marks=marks, id=name))
                    if marks:
                        break  # one skipped entry per (backend, dtype) is enough to report it
    return params


def rand(*shape, dtype=torch.float32, device="cpu", gen: torch.Generator | None = None) -> torch.Tensor:
    """Fresh standard-normal values (float32 draws, then cast), never zeros."""
    t = torch.randn(shape, generator=gen, dtype=torch.float32)
    t = torch.where(t == 0, torch.full_like(t, 0.5), t)
    return t.to(device=device, dtype=dtype)


def poisoned(*shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """An output buffer full of NaN, so elements a kernel fails to write show up."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def assert_close(got: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor, dtype: torch.dtype, what: str = "",
                 reduction: torch.Tensor | float = 0.0) -> None:
    """``|got - ref| <= TOL[dtype] * (magnitude + 1e-3) + reduction`` elementwise, NaN never passes.

    ``ref`` is the float64 result and ``magnitude`` the float64 sum of the absolute values of the
    terms that make each element, so cancellation does not make the bound meaningless. ``reduction``: the
    rounding bound of a reduction inside the op (which grows with its length), where it has one.
    """
    got = f64(got)
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    bound = TOL[dtype] * (magnitude + 1e-3) + reduction
    ok = (got - ref).abs() <= bound
    if not bool(ok.all()):
        bad = (~ok).nonzero()[:5].tolist()
        idx = tuple(bad[0])
        raise AssertionError(f"{what}: {int((~ok).sum())} of {ok.numel()} elements off, first at {bad}: "
                             f"got {got[idx].item()!r}, want {ref[idx].item()!r} (bound {bound[idx].item():.3g})")


@pytest.fixture(autouse=True)
def _default_backend_rules(monkeypatch):
    """Each test starts from the default backend rules ($L2C_BACKEND unset, no use_backend block)."""
    monkeypatch.delenv("L2C_BACKEND", raising=False)
    saved = list(_backend._override)
    _backend._override.clear()
    yield
    _backend._override[:] = saved


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def cpu_backend_params():
    """pytest params ``backend`` for every backend that runs on CPU tensors here."""
    return [pytest.param(b, id=b) for b in ops.available_backends("cpu")]


def compile_backend_params():
    """``cpu_backend_params`` and ``None`` (the default rules, id ``default``)."""
    return [pytest.param(None, id="default")] + cpu_backend_params()


def compiled(fn):
    """``fn`` under ``torch.compile(fullgraph=True)``: any graph break is an error. ``aot_eager`` runs
    the fake kernels and functionalisation of the in-place ops without code generation."""
    return torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=False)


@pytest.fixture
def first_use(monkeypatch):
    """The op state of a fresh process (no backend facts looked up, Triton kernels not imported) and
    a fresh torch.compile cache, so that a compiled function traces the ops' first use."""
    monkeypatch.setattr(_backend, "_facts", {})
    monkeypatch.setattr(ops, "_triton_module", None)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
