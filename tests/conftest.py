"""Shared test fixtures, and the ``integration`` marker for everything under
``tests/integration/`` (real SLURM and Ray clusters, SIGKILLs, worker deaths, a Jupyter kernel,
the example scripts): ``pytest -m "not integration"`` runs the fast suite alone."""

from pathlib import Path

import pytest
import torch

INTEGRATION = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: on a busy 2-core machine torch's thread pool makes them several times
    slower than one thread does. Restores the thread count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
