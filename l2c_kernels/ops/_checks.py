"""Argument validation for the fused ops, identical for every backend.

Each ``check_<op>`` raises :class:`ValueError` naming the argument and the expected shape before
any kernel runs, and returns the tensors to hand to the backend: read-only arguments that are not
contiguous (e.g. ``shift, scale = emb.chunk(2, dim=1)`` of a ``[B, 2C]`` tensor) are copied to
contiguous ones; arguments written in place must already be contiguous.

Memory-overlap checks read ``data_ptr()`` and are skipped while ``torch.compile`` traces (fake
tensors have no storage), for meta tensors, and with ``memory=False`` (the ops' fake kernels).
"""
from __future__ import annotations

import math

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fail(op: str, msg: str) -> None:
    raise ValueError(f"l2c_kernels.ops.{op}: {msg}")


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _is_tensor(t, op: str, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(op, f"'{name}' must be a torch.Tensor, got {type(t).__name__}")


def _activation(t, op: str, name: str) -> None:
    """``t`` (written in place) is a contiguous [B, N, C] tensor of a supported dtype."""
    _is_tensor(t, op, name)
    if t.dim() != 3:
        _fail(op, f"'{name}' must be a 3-D [B, N, C] tensor, got shape {_shape(t)}")
    if t.dtype not in SUPPORTED_DTYPES:
        _fail(op, f"'{name}' must be float32, float16 or bfloat16, got {t.dtype}")
    if not t.is_contiguous():
        _fail(op, f"'{name}' is written in place and must be contiguous; got strides {list(t.stride())} "
                  f"for shape {_shape(t)}")


def _same_kind(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str, op: str) -> None:
    if t.device != ref.device:
        _fail(op, f"'{name}' is on {t.device} but '{ref_name}' is on {ref.device}")
    if t.dtype != ref.dtype:
        _fail(op, f"'{name}' has dtype {t.dtype} but '{ref_name}' has dtype {ref.dtype} "
                  f"(all tensor arguments must share one dtype)")


def _like(t, name: str, ref: torch.Tensor, ref_name: str, op: str, inplace: bool) -> torch.Tensor:
    """``t`` has the shape, dtype and device of ``ref``; returned contiguous (checked if in place)."""
    _is_tensor(t, op, name)
    if t.shape != ref.shape:
        _fail(op, f"'{name}' must have the shape of '{ref_name}', {_shape(ref)}, got {_shape(t)}")
    _same_kind(t, name, ref, ref_name, op)
    if not t.is_contiguous():
        if inplace:
            _fail(op, f"'{name}' is written in place and must be contiguous; got strides "
                      f"{list(t.stride())} for shape {_shape(t)}")
        t = t.contiguous()
    return t


def _per_sample(t, name: str, x: torch.Tensor, op: str) -> torch.Tensor:
    """``t`` is a [B, C] vector for the [B, N, C] activation ``x``; returned contiguous."""
    _is_tensor(t, op, name)
    if t.dim() != 2 or t.shape[0] != x.shape[0] or t.shape[1] != x.shape[2]:
        _fail(op, f"'{name}' must have shape [B, C] = [{x.shape[0]}, {x.shape[2]}] to match 'x' of shape "
                  f"{_shape(x)}, got {_shape(t)}")
    _same_kind(t, name, x, "x", op)
    return t if t.is_contiguous() else t.contiguous()


def _checking_memory(t: torch.Tensor) -> bool:
    return not torch.compiler.is_compiling() and t.device.type != "meta"


def _span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0:
        return False
    a0, a1 = _span(a)
    b0, b1 = _span(b)
    return a0 < b1 and b0 < a1


def _disjoint(out: torch.Tensor, out_name: str, other: torch.Tensor, other_name: str, op: str) -> None:
    """``out`` is written while ``other`` is read: no shared memory."""
    if _overlaps(out, other):
        _fail(op, f"'{out_name}' must not share memory with '{other_name}' ('{out_name}' is written while "
                  f"'{other_name}' is read)")


def _disjoint_or_same(out: torch.Tensor, out_name: str, other: torch.Tensor, other_name: str, op: str) -> None:
    """Elementwise ``out <- f(other)``: the very same memory is fine, a partial overlap is not."""
    if _overlaps(out, other) and _span(out) != _span(other):
        _fail(op, f"'{out_name}' partially overlaps '{other_name}'; they must be disjoint or the very same tensor")


# ------------------------------------------------------------------------------------------ per op


def check_gated_residual(x, y, gate, cache, memory: bool = True):
    op = "gated_residual_"
    _activation(x, op, "x")
    y = _like(y, "y", x, "x", op, inplace=False)
    if gate is not None:
        gate = _per_sample(gate, "gate", x, op)
    if cache is not None:
        cache = _like(cache, "cache", x, "x", op, inplace=True)
    if memory and _checking_memory(x):
        _disjoint(x, "x", y, "y", op)
        if gate is not None:
            _disjoint(x, "x", gate, "gate", op)
        if cache is not None:
            _disjoint(cache, "cache", x, "x", op)
            _disjoint(cache, "cache", y, "y", op)
            if gate is not None:
                _disjoint(cache, "cache", gate, "gate", op)
    return y, gate, cache


def check_cfg_mean_store(x, y, cache, memory: bool = True):
    op = "cfg_mean_store_"
    _activation(x, op, "x")
    y = _like(y, "y", x, "x", op, inplace=False)
    B, N, C = x.shape
    if B % 2:
        _fail(op, f"the batch of 'x' must be even (the two classifier-free guidance halves), got shape {_shape(x)}")
    _is_tensor(cache, op, "cache")
    if cache.dim() != 3 or cache.shape[0] != B // 2 or cache.shape[1] != N or cache.shape[2] != C:
        _fail(op, f"'cache' must have shape [B/2, N, C] = [{B // 2}, {N}, {C}] for 'x' of shape {_shape(x)}, "
                  f"got {_shape(cache)}")
    _same_kind(cache, "cache", x, "x", op)
    if not cache.is_contiguous():
        _fail(op, f"'cache' is written in place and must be contiguous; got strides {list(cache.stride())} "
                  f"for shape {_shape(cache)}")
    if memory and _checking_memory(x):
        _disjoint(x, "x", y, "y", op)
        _disjoint(cache, "cache", x, "x", op)
        _disjoint(cache, "cache", y, "y", op)
    return y


def _check_residual(dst, dst_name, a, a_name, b, b_name, op, memory=True):
    """The residual ops are elementwise over tensors of any one shape."""
    _is_tensor(dst, op, dst_name)
    if dst.dtype not in SUPPORTED_DTYPES:
        _fail(op, f"'{dst_name}' must be float32, float16 or bfloat16, got {dst.dtype}")
    if not dst.is_contiguous():
        _fail(op, f"'{dst_name}' is written in place and must be contiguous; got strides {list(dst.stride())} "
                  f"for shape {_shape(dst)}")
    a = _like(a, a_name, dst, dst_name, op, inplace=False)
    b = _like(b, b_name, dst, dst_name, op, inplace=False)
    if memory and _checking_memory(dst):
        _disjoint_or_same(dst, dst_name, a, a_name, op)
        _disjoint_or_same(dst, dst_name, b, b_name, op)
    return a, b


def check_residual_delta_store(cache, out, inp, memory: bool = True):
    return _check_residual(cache, "cache", out, "out", inp, "inp", "residual_delta_store_", memory)


def check_residual_apply(out, inp, cache, memory: bool = True):
    return _check_residual(out, "out", inp, "inp", cache, "cache", "residual_apply_", memory)


def _coefficient(v, name: str, op: str) -> float:
    if isinstance(v, (bool, torch.Tensor)) or not isinstance(v, (int, float)) or not math.isfinite(v):
        _fail(op, f"'{name}' must be a finite float, got {v!r}")
    return float(v)


def check_forecast_residual(x, y0, y1, y2, gate, c0, c1, c2, memory: bool = True):
    op = "forecast_residual_"
    _activation(x, op, "x")
    y0 = _like(y0, "y0", x, "x", op, inplace=False)
    y1 = _like(y1, "y1", x, "x", op, inplace=False)
    if y2 is not None:
        y2 = _like(y2, "y2", x, "x", op, inplace=False)
    if gate is not None:
        gate = _per_sample(gate, "gate", x, op)
    c0, c1, c2 = (_coefficient(c, name, op) for c, name in ((c0, "c0"), (c1, "c1"), (c2, "c2")))
    if memory and _checking_memory(x):
        for t, name in ((y0, "y0"), (y1, "y1"), (y2, "y2"), (gate, "gate")):
            if t is not None:
                _disjoint(x, "x", t, name, op)
    return y0, y1, y2, gate, c0, c1, c2


def check_adaln_modulate(x, shift, scale, eps):
    op = "adaln_modulate"
    _is_tensor(x, op, "x")
    if x.dim() != 3:
        _fail(op, f"'x' must be a 3-D [B, N, C] tensor, got shape {_shape(x)}")
    if x.dtype not in SUPPORTED_DTYPES:
        _fail(op, f"'x' must be float32, float16 or bfloat16, got {x.dtype}")
    if not x.is_contiguous():
        x = x.contiguous()
    shift = _per_sample(shift, "shift", x, op)
    scale = _per_sample(scale, "scale", x, op)
    if isinstance(eps, torch.Tensor) or not isinstance(eps, (int, float)) or not eps >= 0:
        _fail(op, f"'eps' must be a float >= 0, got {eps!r}")
    return x, shift, scale, float(eps)
