import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of small network tests.

    On 2-core CI machines shared with other jobs, OpenMP threads that wait on a descheduled peer make a step
    up to 20x slower; one thread keeps these small tests fast and predictable.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
