"""onnxruntime latency: median wall time per batch, and side-by-side original vs compressed."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnx.shape_inference

from rankfold.passes.core import ConfigError, ExportError, ProviderError
from rankfold.passes.latency_gate import NO_DIFFERENCE, verdict
from rankfold.runtime.session import create_session, single_input_name

Progress = Callable[[int], None]
SWITCH_BLOCK = 5  # timed runs of one model before `compare_latency` switches to the other
SWITCH_WARMUP = 2  # untimed runs after each switch between models


@dataclass
class LatencyResult:
    """Median milliseconds per run at one batch size; speedup = original_ms / compressed_ms.

    `speedup_low`..`speedup_high` is the interval of the per-block speedups (see
    `ratio_interval`); None when there were too few blocks to bound it.
    """

    batch: int
    original_ms: float
    compressed_ms: float
    speedup: float
    speedup_low: float | None = None
    speedup_high: float | None = None
    threads: int | None = None  # intra-op threads; None: onnxruntime's default (all cores)

    @property
    def verdict(self) -> str:
        """ "faster", "slower", or NO_DIFFERENCE when the interval holds 1 (or is unknown)."""
        return verdict(self.speedup_low, self.speedup_high)

    def to_dict(self) -> dict[str, float | int | str | None]:
        return {**asdict(self), "verdict": self.verdict}


def format_speedup(speedup: float, low: float | None, high: float | None) -> str:
    """ "1.92× (1.85–2.01)", or "no measurable difference (0.97–1.04)"."""
    spread = "" if low is None or high is None else f" ({low:.2f}–{high:.2f})"
    if verdict(low, high) == NO_DIFFERENCE:
        return NO_DIFFERENCE + spread
    return f"{speedup:.2f}×{spread}"


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free interval for the median of `values` (e.g. one ratio per pair of
    blocks).

    The order statistics r_(k) ≤ median ≤ r_(n+1-k) with the largest k whose binomial tail
    P(Bin(n, ½) < k) stays within (1 − level)/2; with fewer than 6 blocks no k qualifies at 95 %
    and the whole range is used (coverage 1 − 2^(1−n), e.g. 94 % for 5 blocks). Blocks, not runs:
    runs within a block share the machine's state, so they are not independent samples. None
    for a single block.
    """
    n = len(values)
    if n < 2:
        return None
    ordered = sorted(values)
    k, tail = 1, 0.0
    while True:
        tail += math.comb(n, k - 1) / 2**n  # P(Bin(n, ½) ≤ k − 1)
        if k >= n // 2 or tail + math.comb(n, k) / 2**n > (1 - level) / 2:
            break
        k += 1
    return ordered[k - 1], ordered[n - k]


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
        run = partial(session.run, None, {feed_name: _fixed_input(batch, input_shape)})
        medians[batch] = statistics.median(time_runs(run, warmup, repeats, progress=progress))
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
    """Time both models side by side on the same fixed-seed input, one result per batch size
    (see `time_side_by_side`). `progress(1)` is called after each timed run
    (2 * len(batch_sizes) * repeats calls in all)."""
    timings = time_side_by_side(
        [original_path, compressed_path],
        input_shape,
        batch_sizes,
        provider,
        warmup,
        repeats,
        threads,
        progress,
    )
    return [timing.compare(0, 1) for timing in timings]


@dataclass
class SideBySide:
    """Timed runs of several models at one batch size, in blocks taken in turn."""

    batch: int
    threads: int | None
    blocks: list[list[list[float]]]  # per model, its blocks of timed runs (ms)

    def median_ms(self, index: int) -> float:
        return statistics.median([t for block in self.blocks[index] for t in block])

    def compare(self, baseline: int, candidate: int) -> LatencyResult:
        """Model `candidate` against model `baseline`: speedup = baseline ms / candidate ms."""
        baseline_ms, candidate_ms = self.median_ms(baseline), self.median_ms(candidate)
        # Blocks of each model ran in the same round under the same load: their ratio is one
        # sample.
        ratios = [
            statistics.median(a) / statistics.median(b)
            for a, b in zip(self.blocks[baseline], self.blocks[candidate], strict=True)
        ]
        low, high = median_interval(ratios) or (None, None)
        return LatencyResult(
            batch=self.batch,
            original_ms=baseline_ms,
            compressed_ms=candidate_ms,
            speedup=baseline_ms / candidate_ms,
            speedup_low=low,
            speedup_high=high,
            threads=self.threads,
        )


def time_side_by_side(
    paths: Sequence[str | Path],
    input_shape: tuple[int, int, int],
    batch_sizes: Sequence[int],
    provider: str = "cpu",
    warmup: int = 5,
    repeats: int = 30,
    threads: int | None = None,
    progress: Progress | None = None,
) -> list[SideBySide]:
    """Time several models side by side on the same fixed-seed input, one entry per batch size.

    All sessions are built first and warmed up; timed runs then take turns in blocks of
    `SWITCH_BLOCK` (A×5, B×5, …, A×5, B×5, …, each after `SWITCH_WARMUP` untimed runs), so load
    from other processes and frequency changes hit every model alike, while none is timed with
    another's thread pool still spinning or its weights evicted from cache, as a deployed model
    is not. (Strict A, B alternation timed a CP ResNet-56 at 1.93× on two threads and 2.56× on
    one, blocks at 2.06× and 2.80×, one model at a time at ~2.0× on two threads: medians of 8.)
    `progress(1)` is called after each timed run (len(paths) * len(batch_sizes) * repeats).
    """
    _check_arguments(input_shape, batch_sizes, warmup, repeats)
    sessions = [create_session(path, provider, threads) for path in paths]
    names = [single_input_name(session, path) for session, path in zip(sessions, paths)]
    timings = []
    for batch in batch_sizes:
        x = _fixed_input(batch, input_shape)
        runs = [partial(session.run, None, {name: x}) for session, name in zip(sessions, names)]
        for run in runs:
            time_runs(run, warmup, 0)  # warm-up only
        blocks: list[list[list[float]]] = [[] for _ in runs]
        while sum(map(len, blocks[-1])) < repeats:
            for index, run in enumerate(runs):
                block = min(SWITCH_BLOCK, repeats - sum(map(len, blocks[index])))
                blocks[index].append(time_runs(run, SWITCH_WARMUP, block, progress=progress))
        timings.append(SideBySide(batch=batch, threads=threads, blocks=blocks))
    return timings


def time_runs(
    run: Callable[[], object],
    warmup: int,
    repeats: int,
    inner: int = 1,
    progress: Progress | None = None,
) -> list[float]:
    """Call `run` `warmup` times untimed, then time `repeats` samples: each sample is the mean
    milliseconds of `inner` calls. `progress(1)` is called after each sample.

    The one timing loop of rankfold: whole models (`measure_latency`, `compare_latency`) and
    the latency table's probes (`runtime.latency_model`) are all timed here.
    """
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(inner):
            run()
        samples.append((time.perf_counter_ns() - start) / 1e6 / inner)
        if progress is not None:
            progress(1)
    return samples


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


# Columns of the bench table: (key in a bench row, header, format); the speedup cell also
# carries its interval, or says there is no measurable difference (`format_speedup`).
BENCH_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("threads", "threads", "{}"),
    ("batch", "batch", "{}"),
    ("original_ms", "original ms", "{:.3f}"),
    ("compressed_ms", "compressed ms", "{:.3f}"),
    ("speedup", "speedup (interval)", "{:.2f}×"),
    ("mac_reduction", "MAC reduction", "{:.2f}×"),
    ("speedup_per_mac_reduction", "speedup / MAC red.", "{:.2f}"),
)


# With INT8 files: the four models side by side; "int8_speedup" is INT8 compressed against INT8
# original (with its interval), "total_speedup" float original against INT8 compressed.
INT8_BENCH_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("threads", "threads", "{}"),
    ("batch", "batch", "{}"),
    ("original_int8_ms", "original INT8 ms", "{:.3f}"),
    ("compressed_int8_ms", "compressed INT8 ms", "{:.3f}"),
    ("int8_speedup", "INT8 speedup (interval)", "{:.2f}×"),
    ("total_speedup", "float orig. / INT8 comp.", "{:.2f}×"),
)


def int8_bench_row(timing: SideBySide, mac_reduction: float) -> dict:
    """A bench row of four models timed side by side (original, original INT8, compressed,
    compressed INT8): the float columns, then the INT8 ones."""
    (row,) = bench_rows([timing.compare(0, 2)], mac_reduction)
    int8 = timing.compare(1, 3)
    return {
        **row,
        "original_int8_ms": int8.original_ms,
        "compressed_int8_ms": int8.compressed_ms,
        "int8_speedup": int8.speedup,
        "int8_speedup_low": int8.speedup_low,
        "int8_speedup_high": int8.speedup_high,
        "int8_verdict": int8.verdict,
        "total_speedup": timing.compare(0, 3).speedup,
    }


def bench_rows(results: Sequence[LatencyResult], mac_reduction: float) -> list[dict]:
    """One dict per batch size: the latency result plus the MAC reduction and how much of it
    became speed (speedup / MAC reduction; 1.0 means every saved MAC saved time)."""
    if not mac_reduction > 0:
        raise ValueError(f"mac_reduction must be positive, got {mac_reduction}")
    return [
        {
            **row.to_dict(),
            "mac_reduction": mac_reduction,
            "speedup_per_mac_reduction": row.speedup / mac_reduction,
        }
        for row in results
    ]


def threads_label(threads: int | None) -> str:
    return "all cores" if threads is None else str(threads)


def format_bench_row(
    row: dict, columns: tuple[tuple[str, str, str], ...] = BENCH_COLUMNS
) -> list[str]:
    """A bench row's cells, formatted as `columns` say (for text or rich tables)."""
    cells = []
    for key, _, fmt in columns:
        if key in ("speedup", "int8_speedup"):
            cells.append(format_speedup(row[key], row[f"{key}_low"], row[f"{key}_high"]))
        elif key == "threads":
            cells.append(threads_label(row["threads"]))
        else:
            cells.append(fmt.format(row[key]))
    return cells


def bench_providers(
    original_path: str | Path,
    compressed_path: str | Path,
    input_shape: tuple[int, int, int],
    batch_sizes: Sequence[int],
    providers: Sequence[str] = ("cpu",),
    mac_reduction: float | None = None,
    warmup: int = 5,
    repeats: int = 30,
    threads: Sequence[int | None] = (None,),
    progress: Progress | None = None,
    int8: tuple[str | Path, str | Path] | None = None,
) -> dict:
    """The bench table for each provider, as JSON-ready data (`progress` as in compare_latency).

    `int8`: the INT8 files of (original, compressed); all four models are then timed side by
    side and each row has INT8_BENCH_COLUMNS too.

    One row per thread count and batch size (None: onnxruntime's default, all cores).
    `mac_reduction` defaults to the ratio of the two files' conv/linear MACs (`onnx_macs`). A
    provider this machine cannot run (e.g. cuda without onnxruntime-gpu or a GPU) is recorded
    as {"skipped": reason} instead of failing the whole bench.
    """
    if mac_reduction is None:
        mac_reduction = onnx_macs(original_path) / onnx_macs(compressed_path)
    out: dict = {
        "original": str(original_path),
        "compressed": str(compressed_path),
        "input_shape": list(input_shape),
        "mac_reduction": mac_reduction,
        "threads": list(threads),
        "providers": {},
    }
    paths = [original_path, compressed_path]
    if int8 is not None:
        out["original_int8"], out["compressed_int8"] = map(str, int8)
        paths = [original_path, int8[0], compressed_path, int8[1]]
    for provider in providers:
        try:
            timings = [
                timing
                for count in threads
                for timing in time_side_by_side(
                    paths,
                    input_shape,
                    batch_sizes,
                    provider=provider,
                    warmup=warmup,
                    repeats=repeats,
                    threads=count,
                    progress=progress,
                )
            ]
        except ProviderError as exc:
            out["providers"][provider] = {"skipped": str(exc)}
            continue
        if int8 is None:
            rows = bench_rows([timing.compare(0, 1) for timing in timings], mac_reduction)
        else:
            rows = [int8_bench_row(timing, mac_reduction) for timing in timings]
        out["providers"][provider] = {"rows": rows}
    return out


def onnx_macs(path: str | Path) -> int:
    """Per-sample multiply-accumulates of an ONNX model's Conv, ConvTranspose, Gemm and MatMul
    nodes.

    The same convention as `rankfold.passes.analyze` (conv + linear layers), read from the file
    with onnx shape inference at batch 1, so a bench of two ONNX files needs no report.
    No library here counts MACs of an ONNX graph, hence this small counter.
    """
    model = onnx.load(str(path))
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].dim_value = 1  # a symbolic batch axis: count one sample
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except onnx.shape_inference.InferenceError as exc:
        raise ExportError(
            f"cannot infer shapes of {path} to count MACs ({exc}); re-export it"
        ) from None
    shapes: dict[str, list[int]] = {
        init.name: list(init.dims) for init in inferred.graph.initializer
    }
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value for d in dims]
    total = 0
    for node in inferred.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        out, a, b = (shapes.get(name) for name in (node.output[0], *node.input[:2]))
        if not out or not a or not b or 0 in out or 0 in a or 0 in b:
            raise ExportError(
                f"cannot count MACs of {node.op_type} node '{node.name}' in {path}: its shapes are "
                "not static; export the model with a fixed input size"
            )
        if node.op_type == "Conv":
            total += math.prod(out) * math.prod(b[1:])  # outputs × (C_in/groups · kh · kw)
        elif node.op_type == "ConvTranspose":
            total += math.prod(a) * math.prod(b[1:])  # inputs × (C_out/groups · kh · kw)
        elif node.op_type == "Gemm":
            trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
            total += math.prod(out) * (a[0] if trans_a else a[-1])
        else:
            total += math.prod(out) * a[-1]
    return total
