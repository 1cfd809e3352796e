"""Fixtures shared across the test folders."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Single-threaded like the bench runner (two threads on two shared cores slow small runs ~20x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
