import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _threads():
    # CI has 2 cores shared with much else; keep torch from oversubscribing
    torch.set_num_threads(1)
    yield
