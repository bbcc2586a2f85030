"""Shared fixtures. Every test runs offline: models come from installed packages."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from torouter.data import RoutingDataset  # noqa: E402
from torouter.synthetic import make_synthetic  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_dataset() -> RoutingDataset:
    """240 prompts over four domains and four simulated experts."""
    return RoutingDataset(make_synthetic(240, seed=0))


@pytest.fixture(scope="session")
def synthetic_split(synthetic_dataset):
    return synthetic_dataset.split(0.25, seed=0)
