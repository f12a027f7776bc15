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

try:  # Hypothesis: the same examples on every run (CI included), no example database carried between runs
    from hypothesis import settings

    settings.register_profile("l2c", derandomize=True, database=None, deadline=None, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "l2c"))
except ImportError:  # the test extra installs it; without it the property tests are skipped by their modules
    pass


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is faster than several, and fair to a shared CI machine
    (``pytestmark = pytest.mark.usefixtures("one_thread")`` in a module, or an autouse fixture in a folder's conftest)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
