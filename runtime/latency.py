"""onnxruntime latency: median wall time per batch, and side-by-side original vs compressed."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime

from rankfold.passes.errors import ConfigError
from rankfold.runtime.providers import create_session, single_input_name

Progress = Callable[[int], None]


@dataclass
class LatencyResult:
    """Median milliseconds per run at one batch size; speedup = original_ms / compressed_ms."""

    batch: int
    original_ms: float
    compressed_ms: float
    speedup: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def measure_latency(
    onnx_path: str | Path,
    input_shape: tuple[int, int, int],
    batch_sizes: Sequence[int],
    provider: str = "cpu",
    warmup: int = 5,
    repeats: int = 30,
    threads: int | None = None,
    progress: Progress | None = None,
) -> dict[int, float]:
    """Median ms of `repeats` timed runs per batch size, after `warmup` untimed runs.

    `progress(1)` is called after each timed run (len(batch_sizes) * repeats calls in all).
    """
    _check_arguments(input_shape, batch_sizes, warmup, repeats)
    session = create_session(onnx_path, provider, threads)
    feed_name = single_input_name(session, onnx_path)
    medians: dict[int, float] = {}
    for batch in batch_sizes:
        feed = {feed_name: _fixed_input(batch, input_shape)}
        for _ in range(warmup):
            session.run(None, feed)
        times = []
        for _ in range(repeats):
            times.append(_timed_run(session, feed))
            if progress is not None:
                progress(1)
        medians[batch] = statistics.median(times)
    return medians


def compare_latency(
    original_path: str | Path,
    compressed_path: str | Path,
    input_shape: tuple[int, int, int],
    batch_sizes: Sequence[int],
    provider: str = "cpu",
    warmup: int = 5,
    repeats: int = 30,
    threads: int | None = None,
    progress: Progress | None = None,
) -> list[LatencyResult]:
    """Time both models side by side on the same fixed-seed input, one result per batch size.

    Both sessions are built first, both are warmed up, then timed runs alternate A, B, A, B, ...
    so that load from other processes and frequency changes hit both models alike.
    `progress(1)` is called after each timed run (2 * len(batch_sizes) * repeats calls in all).
    """
    _check_arguments(input_shape, batch_sizes, warmup, repeats)
    sessions = [
        create_session(original_path, provider, threads),
        create_session(compressed_path, provider, threads),
    ]
    names = [
        single_input_name(sessions[0], original_path),
        single_input_name(sessions[1], compressed_path),
    ]
    results = []
    for batch in batch_sizes:
        x = _fixed_input(batch, input_shape)
        feeds = [{name: x} for name in names]
        for session, feed in zip(sessions, feeds, strict=True):
            for _ in range(warmup):
                session.run(None, feed)
        times: list[list[float]] = [[], []]
        for _ in range(repeats):
            for index in (0, 1):
                times[index].append(_timed_run(sessions[index], feeds[index]))
                if progress is not None:
                    progress(1)
        original_ms = statistics.median(times[0])
        compressed_ms = statistics.median(times[1])
        results.append(
            LatencyResult(
                batch=batch,
                original_ms=original_ms,
                compressed_ms=compressed_ms,
                speedup=original_ms / compressed_ms,
            )
        )
    return results


def _timed_run(session: onnxruntime.InferenceSession, feed: dict[str, np.ndarray]) -> float:
    start = time.perf_counter_ns()
    session.run(None, feed)
    return (time.perf_counter_ns() - start) / 1e6


def _fixed_input(batch: int, input_shape: tuple[int, int, int]) -> np.ndarray:
    # A fixed seed makes reruns time the same values (matters little for dense convs, but
    # keeps denormals and cache behaviour comparable between runs).
    return np.random.default_rng(0).standard_normal((batch, *input_shape), dtype=np.float32)


def _check_arguments(
    input_shape: tuple[int, int, int], batch_sizes: Sequence[int], warmup: int, repeats: int
) -> None:
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ConfigError(
            f"input shape must be C,H,W with positive sizes, got {tuple(input_shape)}; "
            "pass e.g. 3,32,32"
        )
    if not batch_sizes or min(batch_sizes) < 1:
        raise ConfigError(
            f"batch sizes must be a non-empty list of positive integers, got {list(batch_sizes)}; "
            "pass e.g. 1,8,32"
        )
    if warmup < 0 or repeats < 1:
        raise ConfigError(
            f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}; "
            "pass e.g. --warmup 5 --repeats 30"
        )
