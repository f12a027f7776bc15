"""Backend selection for the fused ops.

Backends:

``cpp``
    ``torch.ops.l2c`` on CPU tensors: the C++ kernels of the compiled extension ``l2c_kernels._C``.
``cuda``
    ``torch.ops.l2c`` on CUDA tensors, when the extension was built with its CUDA kernels.
``triton``
    The Triton kernels of :mod:`l2c_kernels.ops.triton` (``torch.ops.l2c_triton``), on CUDA tensors;
    on CPU tensors only under the Triton interpreter (``TRITON_INTERPRET=1`` set before the first op
    runs with this backend), which is meant for testing.
``torch``
    Plain PyTorch (:mod:`l2c_kernels.ops.reference`): any device, differentiable, always available.

Which one runs, first match wins:

1. the ``backend=`` keyword of the call;
2. the innermost :func:`use_backend` block;
3. the ``L2C_BACKEND`` environment variable (read at each eager call; ``auto`` or unset: default);
4. the default for the tensors' device: CUDA ``cuda`` > ``triton`` > ``torch``; CPU ``cpp`` > ``torch``;
   any other device ``torch``.

A backend named in 1-3 that cannot run on the tensors' device raises :class:`BackendUnavailableError`
saying why. When autograd has to record the call (grad mode on and an input requires grad), the
differentiable ``torch`` backend runs unless 1 or 2 names another one, which is an error.

Under ``torch.compile`` the choice is made while tracing and is part of the compiled graph.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator

import torch

from .._build import extension_error, has_cpu_kernels, has_cuda_kernels

BACKENDS = ("cpp", "cuda", "triton", "torch")
ENV_VAR = "L2C_BACKEND"

_DEFAULT_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}

# Innermost use_backend() last. A module global (not thread-local) so that torch.compile can read it.
_override: list[str] = []

# Facts that cannot change in a process, filled on first use.
_facts: dict[str, object] = {}


class BackendUnavailableError(RuntimeError):
    """The backend asked for cannot run on the tensors' device in this installation."""


# Run, not traced, by torch.compile (the first lookup may import the extension under a lock), and
# its result taken as a constant: the facts cannot change in a process.
@torch.compiler.assume_constant_result
def _fact(key: str) -> object:
    try:
        return _facts[key]
    except KeyError:
        pass
    if key == "cpp":
        value: object = has_cpu_kernels()
    elif key == "cuda_kernels":
        value = has_cuda_kernels()
    elif key == "cuda_available":
        value = bool(torch.cuda.is_available())
    else:
        assert key == "triton_installed", f"unknown fact {key!r}"
        value = importlib.util.find_spec("triton") is not None
    _facts[key] = value
    return value


@torch.compiler.assume_constant_result
def triton_interpreted() -> bool:
    """Whether the Triton kernels run (or, once first used, will run) under the Triton interpreter.

    Fixed when :mod:`l2c_kernels.ops.triton` is first imported: ``triton.jit`` picks the interpreter
    when a kernel is defined.
    """
    mode = _facts.get("triton_interpreted")
    if mode is not None:
        return bool(mode)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _device_type(device: torch.device | str | torch.Tensor) -> str:
    if isinstance(device, torch.Tensor):
        return device.device.type
    if isinstance(device, torch.device):
        return device.type
    return torch.device(device).type


def _why_unavailable(name: str, dev: str) -> str | None:
    """None if backend ``name`` can run on ``dev`` tensors, else the reason."""
    if name == "torch":
        return None
    if name == "cpp":
        if dev != "cpu":
            return "the C++ kernels run on CPU tensors only"
        if not _fact("cpp"):
            return f"l2c_kernels._C is not available ({extension_error()})"
        return None
    if name == "cuda":
        if dev != "cuda":
            return "the CUDA kernels run on CUDA tensors only"
        if not _fact("cpp"):
            return f"l2c_kernels._C is not available ({extension_error()})"
        if not _fact("cuda_kernels"):
            return "l2c_kernels._C was built without CUDA kernels"
        if not _fact("cuda_available"):
            return "no CUDA device is available"
        return None
    if name == "triton":
        if not _fact("triton_installed"):
            return "the triton package is not installed"
        if dev == "cuda":
            if not _fact("cuda_available"):
                return "no CUDA device is available"
            if triton_interpreted():
                return "the Triton kernels were defined under TRITON_INTERPRET=1 and run on CPU tensors only"
            return None
        if dev == "cpu":
            if triton_interpreted():
                return None
            return ("on CPU tensors the Triton kernels run only under the Triton interpreter "
                    "(set TRITON_INTERPRET=1 before the first Triton op runs)")
        return f"the Triton kernels do not run on {dev} tensors"
    raise ValueError(f"unknown l2c_kernels.ops backend {name!r}; expected one of {BACKENDS}")


def available_backends(device: torch.device | str | torch.Tensor = "cpu") -> list[str]:
    """The backends that can run on tensors of ``device``, in the order of :data:`BACKENDS`."""
    dev = _device_type(device)
    return [b for b in BACKENDS if _why_unavailable(b, dev) is None]


def default_backend(device: torch.device | str | torch.Tensor = "cpu") -> str:
    """The backend used for ``device`` tensors when none is requested (keyword, context or env)."""
    dev = _device_type(device)
    for b in _DEFAULT_ORDER.get(dev, ("torch",)):
        if _why_unavailable(b, dev) is None:
            return b
    return "torch"


@torch.compiler.assume_constant_result
def _default_for(dev: str) -> str:
    """:func:`default_backend`, remembered per device type once it cannot change any more (on CPU
    it depends only on whether the extension loaded; elsewhere it is recomputed)."""
    if dev != "cpu":
        return default_backend(dev)
    try:
        return _facts["default_backend:cpu"]  # type: ignore[return-value]
    except KeyError:
        value = _facts["default_backend:cpu"] = default_backend(dev)
        return value


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown l2c_kernels.ops backend {name!r} (from {source}); expected one of {BACKENDS}")
    return name


def _env_backend() -> str | None:
    value = os.environ.get(ENV_VAR)
    if value is None:
        return None
    value = value.strip().lower()
    if value in ("", "auto", "default"):
        return None
    return _check_name(value, f"${ENV_VAR}")


def select(dev: str, requested: str | None = None, needs_grad: bool = False) -> str:
    """The backend for one call on ``dev`` tensors (see the module docstring for the rules)."""
    if requested is not None:
        name, source = _check_name(requested, "backend="), "backend="
    elif _override and _override[-1] is not None:
        name, source = _override[-1], "use_backend()"
    else:
        name, source = _env_backend(), f"${ENV_VAR}"
        if needs_grad:
            return "torch"
    if name is None:
        return _default_for(dev)
    if needs_grad and name != "torch":
        raise ValueError(f"backend {name!r} (from {source}) is not differentiable and an input requires grad; "
                         f"use the 'torch' backend, or call under torch.no_grad()")
    why = _why_unavailable(name, dev)
    if why is not None:
        raise BackendUnavailableError(
            f"l2c_kernels.ops backend {name!r} (from {source}) cannot run on {dev} tensors: {why}. "
            f"Available for {dev}: {available_backends(dev)}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run the ops in this block with backend ``name`` (``None``: the default rules).

    Nested blocks override outer ones; a ``backend=`` keyword overrides the block. The setting is
    process-wide (not per thread).
    """
    if name is not None:
        _check_name(name, "use_backend()")
    _override.append(name)  # type: ignore[arg-type]
    try:
        yield
    finally:
        _override.pop()
