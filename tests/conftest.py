"""Shared fixtures: tiny inputs, real-data lookup that skips cleanly when absent."""

from __future__ import annotations

import pytest

from temlib import paths


@pytest.fixture(scope="session")
def shared_data():
    """``../shared/data`` (real datasets), or skip with a message where it is absent."""
    d = paths.shared_data()
    if d is None:
        pytest.skip(
            "real datasets (../shared/data) are absent on this machine; see data/README.md for their sources"
        )
    return d


@pytest.fixture()
def rng():
    import numpy as np

    return np.random.default_rng(12345)
