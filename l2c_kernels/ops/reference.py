"""The fused ops in plain PyTorch: the ``torch`` backend of :mod:`l2c_kernels.ops`.

Any device, differentiable (autograd records the in-place updates like any in-place op). Low
precision inputs are computed with float32 arithmetic and rounded once where PyTorch's elementwise
kernels allow it (``add_``, ``addcmul_``, ``sub`` compute in float32 for float16/bfloat16), so the
results match the fused kernels to about one rounding.

Arguments are not validated here; :mod:`l2c_kernels.ops` does that before calling these.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gated_residual_(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None = None,
                    cache: torch.Tensor | None = None) -> torch.Tensor:
    """``x += gate[:, None, :] * y`` (``x += y`` without gate); ``cache <- y`` if given."""
    if cache is not None:
        cache.copy_(y)
    if gate is None:
        x.add_(y)
    else:
        x.addcmul_(gate.unsqueeze(1), y)
    return x


def cfg_mean_store_(x: torch.Tensor, y: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """``x += y``; ``cache <- (y[:B/2] + y[B/2:]) / 2``."""
    half = x.shape[0] // 2
    # 0.5 * a + 0.5 * b: scaling by 0.5 is exact, the sum is rounded once, and it cannot overflow.
    # In-place steps (not out=) so that autograd can record them.
    cache.copy_(y[:half]).mul_(0.5).add_(y[half:], alpha=0.5)
    x.add_(y)
    return x


def forecast_residual_(x: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, y2: torch.Tensor | None,
                       gate: torch.Tensor | None, c0: float, c1: float, c2: float) -> torch.Tensor:
    """``x += gate[:, None, :] * (c0 * y0 + c1 * y1 + c2 * y2)`` (no gate: ``x += ...``; no ``y2``: no ``c2`` term)."""
    v = c0 * y0.float() + c1 * y1.float()
    if y2 is not None:
        v = v + c2 * y2.float()
    if gate is not None:
        v = v * gate.float().unsqueeze(1)
    x.copy_(x.float() + v)  # one rounding of x, as the fused kernels
    return x


def _records_grad(*tensors: torch.Tensor) -> bool:
    """Autograd records ops on these tensors (``out=`` variants then raise: copy a result instead)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def residual_delta_store_(cache: torch.Tensor, out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    """``cache <- out - inp``."""
    if _records_grad(cache, out, inp):
        cache.copy_(out - inp)
    else:
        torch.sub(out, inp, out=cache)
    return cache


def residual_apply_(out: torch.Tensor, inp: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """``out <- inp + cache``."""
    if _records_grad(out, inp, cache):
        out.copy_(inp + cache)
    else:
        torch.add(inp, cache, out=out)
    return out


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]`` (no affine, float32 statistics)."""
    C = x.shape[-1]
    n = F.layer_norm(x.float(), (C,), eps=eps)
    out = torch.addcmul(shift.float().unsqueeze(1), n, scale.float().unsqueeze(1) + 1)
    return out.to(x.dtype)
