"""Shared fixtures: the real-data folder (skip without it, fail in CI), a quiet 1-thread torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_limits

from rankfold.models.data import data_dir as _data_dir


@pytest.fixture(autouse=True, scope="session")
def _deterministic_torch() -> None:
    # Two cores run the whole suite; extra intra-op threads only add contention.
    torch.set_num_threads(1)
    threadpool_limits(limits=1)
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _private_decomposition_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    # compress always writes decompositions to the on-disk cache: each test session gets its
    # own, so no run reuses (or is slowed, or passed, by) another run's factorizations.
    os.environ["RANKFOLD_CACHE"] = str(tmp_path_factory.mktemp("decompositions"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """`$RANKFOLD_DATA` (default ../shared/data): skips when absent, fails under
    RANKFOLD_REQUIRE_DATA=1."""
    path = _data_dir()
    if not (path / "README.md").is_file():
        message = f"real data folder {path} not found (set RANKFOLD_DATA)"
        if os.environ.get("RANKFOLD_REQUIRE_DATA") == "1":
            pytest.fail(message + "; RANKFOLD_REQUIRE_DATA=1 makes it required")
        pytest.skip(message)
    return path
