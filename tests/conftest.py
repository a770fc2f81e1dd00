"""Fixtures shared by several test modules.

The suite runs in two processes (the README's `-n 2`): each, and every subprocess a test starts,
gets one OpenMP thread unless OMP_NUM_THREADS says otherwise, so the processes do not compete for
the cores (tiny tensors gain nothing from more threads; set before torch is imported)."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def one_thread():
    """Small tensors on a shared 2-core CPU: one thread is faster, and immune to other processes
    (OpenMP threads that outnumber the free cores spin and can make a step 20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
