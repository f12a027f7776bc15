"""One intra-op thread for these tiny models (faster than several, and fair to a shared CI machine)."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # tests/conftest.py
    yield
