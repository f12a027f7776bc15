"""Test-session setup that must happen before any test module imports Triton.

Without a CUDA device the Triton kernels run under the Triton interpreter. ``triton.jit`` decides
between compiled and interpreted kernels when a kernel is defined, so ``TRITON_INTERPRET=1`` has
to be in the environment before the first import of Triton anywhere in the session.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is faster than several, and fair to a shared CI machine
    (``pytestmark = pytest.mark.usefixtures("one_thread")`` in a module, or an autouse fixture in a folder's conftest)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
