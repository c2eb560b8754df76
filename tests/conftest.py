"""Shared fixtures: the real-data folder (skip without it, fail in CI), a quiet 1-thread torch."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_limits

from rankfold.models.data import data_dir as _data_dir


@pytest.fixture(autouse=True, scope="session")
def _deterministic_torch() -> None:
    # Two xdist workers share the two cores the suite runs on: more intra-op threads only add
    # contention.
    torch.set_num_threads(1)
    threadpool_limits(limits=1)
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _private_caches(tmp_path_factory: pytest.TempPathFactory) -> None:
    # compress always writes decompositions and layer timings to on-disk caches (by default in
    # ~/.cache): each test session (each xdist worker) gets its own, so no run reuses (or is
    # slowed, or passed, by) another run's factorizations or timings.
    os.environ["RANKFOLD_CACHE"] = str(tmp_path_factory.mktemp("decompositions"))
    os.environ["RANKFOLD_LATENCY_CACHE"] = str(tmp_path_factory.mktemp("latency"))


@pytest.fixture(autouse=True, scope="session")
def _onnx_registry_built_once() -> Iterator[None]:
    # torch.onnx.export rebuilds its operator registry (the ONNX IR of every torchlib function)
    # on every call: seconds each, for the suite's many exports. The registry depends only on
    # the opset and is read-only unless custom_translation_table is passed (rankfold never
    # does), so one per opset serves every export; each export still runs in full.
    try:
        from torch.onnx._internal.exporter._registration import ONNXRegistry
    except ImportError:  # a torch without this internal builds it per call, as users get
        yield
        return
    build = ONNXRegistry.from_torchlib.__func__
    built: dict[object, ONNXRegistry] = {}

    def from_torchlib(cls, *args, **kwargs):
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in built:
            built[key] = build(cls, *args, **kwargs)
        return built[key]

    ONNXRegistry.from_torchlib = classmethod(from_torchlib)
    yield
    ONNXRegistry.from_torchlib = classmethod(build)


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
