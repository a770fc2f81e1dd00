"""Fixtures shared by several test modules."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """Small tensors on a shared 2-core CPU: one thread is faster, and immune to other processes
    (OpenMP threads that outnumber the free cores spin and can make a step 20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
