"""Fused elementwise and normalisation ops for cached diffusion-transformer sampling.

Shapes: activations ``[B, N, C]``, per-sample vectors ``[B, C]``; any ``C`` and ``N``. Dtypes
float32, float16 and bfloat16 (all tensors of one call share dtype and device). Every op computes
in float32 and rounds once per stored element.

=============================================  ===============================================================
``gated_residual_(x, y, gate=None, cache=None)``  ``x += gate[:, None, :] * y`` (``x += y`` without gate); ``cache <- y``
                                                  if given, in the same pass. Reusing a cached branch is
                                                  ``gated_residual_(x, cache, gate)``.
``cfg_mean_store_(x, y, cache)``                  ``x += y``; ``cache <- (y[:B/2] + y[B/2:]) / 2`` (cache ``[B/2, N, C]``)
``residual_delta_store_(cache, out, inp)``        ``cache <- out - inp``
``residual_apply_(out, inp, cache)``              ``out <- inp + cache``
``forecast_residual_(x, y0, y1, y2, gate,         ``x += gate[:, None, :] * (c0 * y0 + c1 * y1 + c2 * y2)``: reuse a branch
c0, c1, c2)``                                     by extrapolating its last stored outputs, one pass
``adaln_modulate(x, shift, scale, eps=1e-6)``     ``LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]`` (no affine,
                                                  float32 statistics, biased variance) as a new tensor
=============================================  ===============================================================

The in-place ops return their destination. Arguments are validated before any kernel runs
(``ValueError`` naming the argument); read-only arguments that are not contiguous are copied
(``gate``/``shift``/``scale`` taken with ``.chunk`` from a ``[B, k*C]`` embedding are typical),
destinations must be contiguous and must not share memory with the inputs (the residual ops
accept a destination that is the very same tensor as an input).

Backends (``cpp``, ``cuda``, ``triton``, ``torch``) and how one is chosen: :mod:`l2c_kernels.ops._backend`.
Every op takes ``backend=`` to force one; :func:`use_backend` does it for a block of code.

The ops trace under ``torch.compile(fullgraph=True)`` (``torch.ops.l2c.*`` and
``torch.ops.l2c_triton.*`` have fake implementations) and capture in CUDA graphs: no host
synchronisation, kernels launch on the current stream.
"""
from __future__ import annotations

import importlib

import torch

from .._build import load_extension
from . import _backend, _checks, reference
from ._backend import BACKENDS, BackendUnavailableError, available_backends, default_backend, use_backend

__all__ = [
    "gated_residual_", "cfg_mean_store_", "residual_delta_store_", "residual_apply_", "forecast_residual_",
    "adaln_modulate", "BACKENDS", "BackendUnavailableError", "available_backends", "default_backend", "use_backend",
    "reference",
]

#: ``torch.ops.l2c`` is registered (the compiled extension imported).
HAS_EXTENSION = load_extension() is not None

_triton_module = None


@torch.compiler.assume_constant_result
def _triton() -> bool:
    """Import ``l2c_kernels.ops.triton`` on first use (it defines the kernels, and Triton picks
    compiled or interpreted kernels at definition time). Run, not traced, by ``torch.compile``,
    so a first use inside a compiled function imports it while tracing."""
    global _triton_module
    if _triton_module is None:
        _triton_module = importlib.import_module("l2c_kernels.ops.triton")
    return True


def _needs_grad(*tensors) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(getattr(t, "requires_grad", False) for t in tensors)


#: Backends served by the compiled extension, whose C++ entry points repeat every argument check.
_EXTENSION_BACKENDS = frozenset(("cpp", "cuda"))


def _dev(t) -> str:
    return t.device.type if isinstance(t, torch.Tensor) else "cpu"


def _c(t):
    """A read-only argument as the kernels take it: contiguous (``.chunk`` views are copied)."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def _direct() -> bool:
    """Eager calls to the extension skip the Python checks: its C++ entry points run the same
    checks before any kernel, and only when they fail are the Python checks run to raise the
    clear ``ValueError`` (the Python layer costs ~15 us per call, as much as the kernel at DiT sizes).
    While ``torch.compile`` traces, the Python checks always run (they cost nothing at run time)."""
    return not torch.compiler.is_compiling()


_ERRORS = (RuntimeError, TypeError, AttributeError)


def _extension_call(call, check):
    """``call()`` (the extension's op); if its C++ checks refuse the arguments, ``check()`` (the Python
    checks) raises the clear ``ValueError``; anything it does not catch is re-raised as is."""
    try:
        return call()
    except _ERRORS:
        check()
        raise


def _register_fake(name: str):
    """Register the decorated function as the fake (meta) kernel of ``l2c::name``, if it exists."""
    def deco(fn):
        if HAS_EXTENSION:
            torch.library.register_fake(f"l2c::{name}", fn)
        return fn
    return deco


# ----------------------------------------------------------------------------------- gated_residual_


def gated_residual_(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None = None,
                    cache: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """``x += gate[:, None, :] * y`` (``x += y`` when ``gate`` is None), and ``cache <- y`` when given.

    Args:
        x: ``[B, N, C]``, updated in place (contiguous).
        y: ``[B, N, C]`` branch output (or a cached one, to reuse it).
        gate: ``[B, C]`` per-sample gate, or None.
        cache: ``[B, N, C]`` buffer that receives a copy of ``y`` in the same pass (contiguous), or None.
        backend: force a backend (``"cpp"``, ``"cuda"``, ``"triton"``, ``"torch"``).

    Returns:
        ``x``.
    """
    name = _backend.select(_dev(x), backend, _needs_grad(x, y, gate))
    if name in _EXTENSION_BACKENDS and _direct():
        _extension_call(lambda: torch.ops.l2c.gated_residual_.default(x, _c(y), _c(gate), cache),
                        lambda: _checks.check_gated_residual(x, y, gate, cache))
        return x
    y, gate, cache = _checks.check_gated_residual(x, y, gate, cache)
    if name == "torch":
        reference.gated_residual_(x, y, gate, cache)
    elif name == "triton":
        _triton()
        torch.ops.l2c_triton.gated_residual_(x, y, gate, cache)
    else:
        torch.ops.l2c.gated_residual_(x, y, gate, cache)
    return x


@_register_fake("gated_residual_")
def _gated_residual_fake(x, y, gate, cache) -> None:
    _checks.check_gated_residual(x, y, gate, cache, memory=False)  # meta arguments mixed with real ones end here
    return None


# ----------------------------------------------------------------------------------- cfg_mean_store_


def cfg_mean_store_(x: torch.Tensor, y: torch.Tensor, cache: torch.Tensor, *,
                    backend: str | None = None) -> torch.Tensor:
    """``x += y`` and ``cache <- (y[:B/2] + y[B/2:]) / 2`` in one pass.

    For a branch whose output is cached as the mean of the two classifier-free guidance halves.

    Args:
        x: ``[B, N, C]`` with even ``B``, updated in place (contiguous).
        y: ``[B, N, C]`` branch output.
        cache: ``[B/2, N, C]`` buffer for the mean (contiguous).
        backend: force a backend.

    Returns:
        ``x``.
    """
    name = _backend.select(_dev(x), backend, _needs_grad(x, y))
    if name in _EXTENSION_BACKENDS and _direct():
        _extension_call(lambda: torch.ops.l2c.cfg_mean_store_.default(x, _c(y), cache),
                        lambda: _checks.check_cfg_mean_store(x, y, cache))
        return x
    y = _checks.check_cfg_mean_store(x, y, cache)
    if name == "torch":
        reference.cfg_mean_store_(x, y, cache)
    elif name == "triton":
        _triton()
        torch.ops.l2c_triton.cfg_mean_store_(x, y, cache)
    else:
        torch.ops.l2c.cfg_mean_store_(x, y, cache)
    return x


@_register_fake("cfg_mean_store_")
def _cfg_mean_store_fake(x, y, cache) -> None:
    _checks.check_cfg_mean_store(x, y, cache, memory=False)
    return None


# ----------------------------------------------------------------------------- residual_delta_store_


def residual_delta_store_(cache: torch.Tensor, out: torch.Tensor, inp: torch.Tensor, *,
                          backend: str | None = None) -> torch.Tensor:
    """``cache <- out - inp`` (the residual a block added), for a later :func:`residual_apply_`.

    Elementwise over tensors of any one shape; ``cache`` (contiguous) may be ``out`` or ``inp`` itself.

    Returns:
        ``cache``.
    """
    name = _backend.select(_dev(cache), backend, _needs_grad(out, inp))
    if name in _EXTENSION_BACKENDS and _direct():
        _extension_call(lambda: torch.ops.l2c.residual_delta_store_.default(cache, _c(out), _c(inp)),
                        lambda: _checks.check_residual_delta_store(cache, out, inp))
        return cache
    out, inp = _checks.check_residual_delta_store(cache, out, inp)
    if name == "torch":
        reference.residual_delta_store_(cache, out, inp)
    elif name == "triton":
        _triton()
        torch.ops.l2c_triton.residual_delta_store_(cache, out, inp)
    else:
        torch.ops.l2c.residual_delta_store_(cache, out, inp)
    return cache


@_register_fake("residual_delta_store_")
def _residual_delta_store_fake(cache, out, inp) -> None:
    _checks.check_residual_delta_store(cache, out, inp, memory=False)
    return None


# ----------------------------------------------------------------------------------- residual_apply_


def residual_apply_(out: torch.Tensor, inp: torch.Tensor, cache: torch.Tensor, *,
                    backend: str | None = None) -> torch.Tensor:
    """``out <- inp + cache`` (replay a cached block residual).

    Elementwise over tensors of any one shape; ``out`` (contiguous) may be ``inp`` or ``cache`` itself.

    Returns:
        ``out``.
    """
    name = _backend.select(_dev(out), backend, _needs_grad(inp, cache))
    if name in _EXTENSION_BACKENDS and _direct():
        _extension_call(lambda: torch.ops.l2c.residual_apply_.default(out, _c(inp), _c(cache)),
                        lambda: _checks.check_residual_apply(out, inp, cache))
        return out
    inp, cache = _checks.check_residual_apply(out, inp, cache)
    if name == "torch":
        reference.residual_apply_(out, inp, cache)
    elif name == "triton":
        _triton()
        torch.ops.l2c_triton.residual_apply_(out, inp, cache)
    else:
        torch.ops.l2c.residual_apply_(out, inp, cache)
    return out


@_register_fake("residual_apply_")
def _residual_apply_fake(out, inp, cache) -> None:
    _checks.check_residual_apply(out, inp, cache, memory=False)
    return None


# -------------------------------------------------------------------------------- forecast_residual_


def forecast_residual_(x: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, y2: torch.Tensor | None = None,
                       gate: torch.Tensor | None = None, c0: float = 1.0, c1: float = 0.0, c2: float = 0.0, *,
                       backend: str | None = None) -> torch.Tensor:
    """``x += gate[:, None, :] * (c0 * y0 + c1 * y1 + c2 * y2)`` in one pass.

    Reuses a branch by extrapolating its last stored outputs ``y0, y1, y2``: ``c0, c1, c2`` are the
    Lagrange weights of the polynomial through them, evaluated at the current step (a forecast
    schedule fixes them when it is compiled). Without ``y2`` there is no ``c2`` term, without
    ``gate`` the forecast is added as is. The sum is formed in float32 and ``x`` is rounded once.

    Args:
        x: ``[B, N, C]``, updated in place (contiguous).
        y0, y1: ``[B, N, C]`` stored branch outputs.
        y2: ``[B, N, C]`` a third stored output, or None.
        gate: ``[B, C]`` per-sample gate, or None.
        c0, c1, c2: finite weights.
        backend: force a backend.

    Returns:
        ``x``.
    """
    name = _backend.select(_dev(x), backend, _needs_grad(x, y0, y1, y2, gate))
    if (name in _EXTENSION_BACKENDS and _direct() and type(c0) is float and type(c1) is float
            and type(c2) is float):
        _extension_call(lambda: torch.ops.l2c.forecast_residual_.default(x, _c(y0), _c(y1), _c(y2), _c(gate),
                                                                         c0, c1, c2),
                        lambda: _checks.check_forecast_residual(x, y0, y1, y2, gate, c0, c1, c2))
        return x
    y0, y1, y2, gate, c0, c1, c2 = _checks.check_forecast_residual(x, y0, y1, y2, gate, c0, c1, c2)
    if name == "torch":
        reference.forecast_residual_(x, y0, y1, y2, gate, c0, c1, c2)
    elif name == "triton":
        _triton()
        torch.ops.l2c_triton.forecast_residual_(x, y0, y1, y2, gate, c0, c1, c2)
    else:
        torch.ops.l2c.forecast_residual_(x, y0, y1, y2, gate, c0, c1, c2)
    return x


@_register_fake("forecast_residual_")
def _forecast_residual_fake(x, y0, y1, y2, gate, c0, c1, c2) -> None:
    _checks.check_forecast_residual(x, y0, y1, y2, gate, c0, c1, c2, memory=False)
    return None


# ------------------------------------------------------------------------------------ adaln_modulate


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, *,
                   backend: str | None = None) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale[:, None, :]) + shift[:, None, :]`` as a new tensor.

    LayerNorm over ``C`` without affine parameters: float32 mean and biased variance, ``eps``
    inside the square root (``torch.nn.LayerNorm(C, elementwise_affine=False, eps=eps)``).

    Args:
        x: ``[B, N, C]``.
        shift, scale: ``[B, C]`` (non-contiguous views, e.g. from ``emb.chunk(6, dim=1)``, are fine).
        eps: added to the variance, >= 0.
        backend: force a backend.

    Returns:
        A new contiguous ``[B, N, C]`` tensor of ``x``'s dtype.
    """
    name = _backend.select(_dev(x), backend, _needs_grad(x, shift, scale))
    if name in _EXTENSION_BACKENDS and _direct() and type(eps) is float:
        return _extension_call(lambda: torch.ops.l2c.adaln_modulate.default(_c(x), _c(shift), _c(scale), eps),
                               lambda: _checks.check_adaln_modulate(x, shift, scale, eps))
    x, shift, scale, eps = _checks.check_adaln_modulate(x, shift, scale, eps)
    if name == "torch":
        return reference.adaln_modulate(x, shift, scale, eps)
    if name == "triton":
        _triton()
        return torch.ops.l2c_triton.adaln_modulate(x, shift, scale, eps)
    return torch.ops.l2c.adaln_modulate(x, shift, scale, eps)


@_register_fake("adaln_modulate")
def _adaln_modulate_fake(x, shift, scale, eps):
    _checks.check_adaln_modulate(x, shift, scale, eps)
    return torch.empty_like(x, memory_format=torch.contiguous_format)
