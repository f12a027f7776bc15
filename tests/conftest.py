"""Test-session setup that must happen before any test module imports Triton.

Without a CUDA device the Triton kernels run under the Triton interpreter. ``triton.jit`` decides
between compiled and interpreted kernels when a kernel is defined, so ``TRITON_INTERPRET=1`` has
to be in the environment before the first import of Triton anywhere in the session.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
