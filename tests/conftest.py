"""Shared test set-up: deterministic seeds, few threads (CI has 2 cores), Ray kept inside tmp dirs."""
import os

import pytest
import torch

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
