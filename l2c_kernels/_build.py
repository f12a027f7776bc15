"""What the compiled part of l2c_kernels provides in this installation.

The extension module ``l2c_kernels._C`` registers the operators ``torch.ops.l2c.*`` (C++ CPU
kernels, plus CUDA kernels in CUDA builds). The package works without it: callers check
:func:`has_cpu_kernels` / :func:`has_cuda_kernels` and fall back to other backends.

    >>> from l2c_kernels._build import build_info
    >>> build_info()["extension_loaded"]
    True
"""
from __future__ import annotations

import importlib
import importlib.util
import threading
from types import ModuleType
from typing import Any

#: The operators l2c_kernels._C defines, in the ``l2c`` namespace.
OPS = ("gated_residual_", "cfg_mean_store_", "residual_delta_store_", "residual_apply_", "forecast_residual_",
       "adaln_modulate")

_lock = threading.Lock()
_state: tuple[ModuleType | None, str | None] | None = None


def _load() -> tuple[ModuleType | None, str | None]:
    global _state
    with _lock:
        if _state is None:
            try:
                import torch  # noqa: F401  (libtorch must be loaded before the extension)

                _state = (importlib.import_module("l2c_kernels._C"), None)
            except Exception as exc:  # ImportError, OSError (undefined symbol), RuntimeError
                msg = f"{type(exc).__name__}: {exc}"
                if "undefined symbol" in msg or "version" in msg.lower():
                    msg += (
                        " (the extension was probably built against another torch; rebuild it with "
                        "`pip install --no-build-isolation -e .`)"
                    )
                _state = (None, msg)
        return _state


def load_extension() -> ModuleType | None:
    """Import ``l2c_kernels._C`` once (registering ``torch.ops.l2c``); None if it is unavailable."""
    return _load()[0]


def extension_error() -> str | None:
    """Why ``l2c_kernels._C`` could not be imported, or None if it was."""
    return _load()[1]


def has_cpu_kernels() -> bool:
    """True when the C++ CPU kernels of ``torch.ops.l2c`` are available."""
    return load_extension() is not None


def has_cuda_kernels() -> bool:
    """True when the CUDA kernels of ``torch.ops.l2c`` were compiled into the extension.

    Whether they can run also needs ``torch.cuda.is_available()``.
    """
    ext = load_extension()
    return ext is not None and bool(ext.cuda_compiled())


def _op_backends() -> dict[str, list[str]]:
    import torch

    out = {}
    for name in OPS:
        qualname = f"l2c::{name}"
        try:
            keys = [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, k)]
        except RuntimeError:  # operator not registered
            keys = []
        out[name] = keys
    return out


def build_info() -> dict[str, Any]:
    """Which compiled backends this installation has.

    Keys:
        extension_loaded: ``l2c_kernels._C`` was imported (C++ CPU kernels registered).
        extension_error: why it was not, else None.
        cuda_kernels: CUDA kernels were compiled into the extension.
        cuda_archs: CUDA architectures they were compiled for, e.g. ``["8.0", "9.0"]``.
        cuda_version: CUDA runtime version they were built against, e.g. ``"12.8"``, else None.
        cuda_available: ``torch.cuda.is_available()`` now.
        torch_version_built: torch version the extension was built against, else None.
        torch_version: torch version imported now.
        cpu_vectorization: variant of the C++ CPU kernels in use: ``"avx2"`` or ``"default"``
            (baseline SIMD of the build: SSE2 on x86-64, NEON on arm64), else None.
        cpu_variants: variants compiled in, e.g. ``["default", "avx2"]``.
        cpu_parallel: ``"openmp"`` (rows spread over torch's intra-op threads) or ``"serial"``.
        ops: for each ``torch.ops.l2c`` operator, the dispatch keys with a compiled kernel.
        triton_available: the ``triton`` package is installed.
    """
    import torch

    ext, err = _load()
    info: dict[str, Any] = {
        "extension_loaded": ext is not None,
        "extension_error": err,
        "cuda_kernels": False,
        "cuda_archs": [],
        "cuda_version": None,
        "cuda_available": bool(torch.cuda.is_available()),
        "torch_version_built": None,
        "torch_version": torch.__version__,
        "cpu_vectorization": None,
        "cpu_variants": [],
        "cpu_parallel": None,
        "ops": {name: [] for name in OPS},
        "triton_available": importlib.util.find_spec("triton") is not None,
    }
    if ext is not None:
        archs = ext.cuda_archs()
        info.update(
            cuda_kernels=bool(ext.cuda_compiled()),
            cuda_archs=[a for a in archs.replace(" ", ";").split(";") if a],
            cuda_version=ext.cuda_version(),
            torch_version_built=ext.torch_version(),
            cpu_vectorization=ext.cpu_capability(),
            cpu_variants=[v for v in ext.cpu_variants().split(",") if v],
            cpu_parallel=ext.cpu_parallel(),
            ops=_op_backends(),
        )
    return info
