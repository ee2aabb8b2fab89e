"""Shared test fixtures."""

import pytest
import torch
from clusters import ray_cluster, slurm_cluster  # noqa: F401 - real clusters (tests/clusters.py)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: on a busy 2-core machine torch's thread pool makes them several times
    slower than one thread does. Restores the thread count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
