"""Fixtures shared by the tests. Shared plain helpers (the identity grid, the
colour-correspondence harness) are functions in ``tests/helpers.py``: ``from helpers import ...``.
"""

import pytest
import torch


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core CPU, OpenMP spin-waits make 2 threads far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Every test starts with the process's torch thread count: a test (or code it calls, e.g.
    a benchmark helper) that sets it must not change the numerics of the tests after it (the
    sweep refuses to resume cells that ran with another thread count)."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
