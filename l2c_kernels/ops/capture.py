"""Whether a CUDA graph -- or the CPU emulation of one (``cuda_graphs="emulate"``) -- is being captured now.

Code inside a captured step must not take host-side shortcuts that are free only on the CPU (reading a timestep on
the host to look up a cached embedding, say): a graph freezes what the host did at capture, so such a shortcut would
replay the capture's value at every step. Those shortcuts ask :func:`capturing` and step aside.
"""
from __future__ import annotations

import contextlib

import torch

_emulated_depth = 0


def capturing() -> bool:
    """True inside a real CUDA graph capture on the current stream or inside an emulated capture."""
    if _emulated_depth:
        return True
    return bool(torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


@contextlib.contextmanager
def emulated_capture():
    """Mark the enclosed code as captured (the CPU emulation of a CUDA graph capture)."""
    global _emulated_depth
    _emulated_depth += 1
    try:
        yield
    finally:
        _emulated_depth -= 1
