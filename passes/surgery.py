"""Graph surgery: swap each planned layer for its factorized block at the same dotted name.

The model is an fx GraphModule, or on the capture path (`rankfold.passes.capture`) the model
itself: the swap is at module level either way, and only a GraphModule regenerates its code.

The input GraphModule is never changed: the pass deep-copies it (as torch.fx's `fuse(inplace=False)`
does), fills each block from the original weights, and returns the new module with a per-layer
report. `restructure` builds the same blocks without factorizing, so a saved state dict can be
loaded into them (that is how a compressed model is restored from its plan).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from torch import nn

from rankfold.passes.analysis import LayerInfo, ModelAnalysis
from rankfold.passes.capture import recompiled
from rankfold.passes.core import ConfigError, DecompositionError, import_gated
from rankfold.passes.methods import get_method
from rankfold.passes.plan import LayerPlan, Plan, check_plan
from rankfold.passes.search.cache import (
    CachedBlock,
    DecompositionCache,
    Fill,
    compute_threads,
    fill_entry,
    fit_errors,
)
from rankfold.passes.search.evaluator import spawn_context


@dataclass
class LayerReport:
    name: str
    type: str
    method: str | None
    rank: list[int] | None
    params: int  # after the pass (the original's when skipped)
    macs: int
    original_params: int
    original_macs: int
    rel_error: float | None  # ‖W − Ŵ‖ / ‖W‖
    status: str  # "decomposed" | "skipped"
    reason: str
    seconds: float = 0.0
    from_cache: bool = False  # the block was factorized before (by rank search), not again
    # With layer statistics (a data-aware fit): the relative output error on them, and both
    # errors of the weight-only fit at the same ranks, for comparison.
    output_error: float | None = None
    weight_only_rel_error: float | None = None
    weight_only_output_error: float | None = None
    extras: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        row = asdict(self)
        row.update(row.pop("extras"))
        return row


@dataclass
class DecompositionReport:
    layers: list[LayerReport]

    def by_name(self) -> dict[str, LayerReport]:
        return {row.name: row for row in self.layers}


def _checked_layer(gm: nn.Module, analysis: ModelAnalysis, entry: LayerPlan) -> LayerInfo:
    try:
        layer = analysis.layer(entry.name)
        module = gm.get_submodule(entry.name)
    except (KeyError, AttributeError):
        raise DecompositionError(
            f"plan names layer '{entry.name}', which this model does not have; "
            "make the plan with this model"
        ) from None
    if type(module).__name__ != entry.type:
        raise DecompositionError(
            f"plan expects '{entry.name}' to be {entry.type} but the model has "
            f"{type(module).__name__}; make the plan with this model"
        )
    return layer


def restructure(gm: nn.Module, analysis: ModelAnalysis, plan: Plan) -> nn.Module:
    """A copy of `gm` with every planned layer replaced by an unfilled block of its shape."""
    check_plan(plan, analysis)
    new = copy.deepcopy(gm)
    for entry in plan.decomposed():
        layer = _checked_layer(new, analysis, entry)
        new.set_submodule(entry.name, get_method(entry.method).build(layer, tuple(entry.ranks)))
    return recompiled(new)


def pool_shape(jobs: int, cores: int | None = None) -> tuple[int, int]:
    """(workers, BLAS threads per worker): one single-threaded worker per core, up to the job
    count. One thread each even for a lone layer: on the shared 2-core VM a HOOI sweep of a
    512-channel 3×3 kernel took 3.6 s on two threads and 0.36 s on one (OpenMP threads spin
    against the other processes), and layers, not threads, are the parallelism that scales."""
    cores = max(1, cores or os.cpu_count() or 1)
    return max(1, min(cores, jobs)), 1


def _fill_single_threaded(*args: object) -> CachedBlock:
    with compute_threads(1):
        return fill_entry(*args)


class FillProcesses:
    """Worker processes for GIL-bound fills (see `worker_processes`), started on creation: each
    fresh interpreter imports torch, which a caller can overlap with its own work (`compress`
    starts them before it exports original.onnx and plans). With `spare_core` at most
    cores − 1 of them load at a time, leaving the caller a core (two loading beside an export on
    two cores slow it markedly: BENCHMARKS.md, decomposition speed, round 8). `fill` has
    `Fill`'s signature."""

    def __init__(self, workers: int, spare_core: bool = False) -> None:
        context = spawn_context()
        gate = context.Semaphore(max(1, (os.cpu_count() or 1) - 1)) if spare_core else None
        self._pool = ProcessPoolExecutor(
            workers, mp_context=context, initializer=import_gated, initargs=(gate, __name__)
        )
        # The executor starts one process per task submitted while none is idle; unpickling
        # `int` imports nothing, so the initializer does the loading.
        for _ in range(workers):
            self._pool.submit(int)

    def fill(self, *args: object) -> CachedBlock:
        return self._pool.submit(_fill_single_threaded, *args).result()

    def close(self, cancel: bool = False) -> None:
        self._pool.shutdown(wait=True, cancel_futures=cancel)

    def __enter__(self) -> FillProcesses:
        return self

    def __exit__(self, error_type: type[BaseException] | None, *_: object) -> None:
        self.close(cancel=error_type is not None)


def processes_pay(workers: int, gil_bound_fills: int) -> bool:
    """Whether `workers` processes are worth starting for so many GIL-bound fills: at least two
    workers, and two fills per worker to amortise their start."""
    return workers >= 2 and gil_bound_fills >= 2 * workers


@contextmanager
def worker_processes(
    workers: int, gil_bound_fills: int, started: FillProcesses | None = None
) -> Iterator[Fill | None]:
    """A fill that runs in one of `workers` processes, given at least two GIL-bound fills per
    worker to amortise starting them (a fresh interpreter imports torch), or in `started`
    processes for any GIL-bound fill: methods whose inner loops are Python-level NumPy steps
    on small arrays (EPC's sweeps) hold the GIL most of the time, so threads wait on each
    other, and only processes run them side by side. A layer thread hands its fill over and
    waits without the GIL."""
    if started is not None and gil_bound_fills > 0:
        yield started.fill
        return
    if not processes_pay(workers, gil_bound_fills):
        yield None
        return
    with FillProcesses(workers) as processes:
        yield processes.fill


@contextmanager
def layer_pool(
    workers: int,
    threads: int | None,
    gil_bound_fills: int,
    started: FillProcesses | None = None,
) -> Iterator[tuple[ThreadPoolExecutor, Fill | None]]:
    """`workers` layer threads on `threads` BLAS threads each, and the worker processes'
    fill for GIL-bound methods (None when `worker_processes` finds them not worth starting;
    `started` processes are used, not closed)."""
    with (
        compute_threads(threads),
        worker_processes(workers, gil_bound_fills, started) as remote,
        ThreadPoolExecutor(workers) as pool,
    ):
        yield pool, remote


def largest_first(planned: list[LayerPlan], layers: dict[str, LayerInfo]) -> list[LayerPlan]:
    """Planned layers by falling size (weights × largest rank, what a factorization's sweeps
    scale with): with the big ones started first, a few wide layers do not run alone at the end
    while the other workers idle (longest-processing-time-first scheduling)."""

    def size(entry: LayerPlan) -> int:
        layer = layers[entry.name]
        weights = layer.in_features * layer.out_features * layer.kernel_area
        return weights * max(entry.ranks, default=1)

    return sorted(planned, key=size, reverse=True)


def decompose(
    gm: nn.Module,
    analysis: ModelAnalysis,
    plan: Plan,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    cache: DecompositionCache | None = None,
    cores: int | None = None,
    compare_weight_only: bool = True,
    processes: FillProcesses | None = None,
) -> tuple[nn.Module, DecompositionReport]:
    """Apply `plan` to a copy of `gm`; returns the new module and one report row per layer.

    Blocks come from `cache` (the one rank search filled, so a searched block is not factorized
    again; default: a cache in memory for this call). Layers are factorized concurrently on
    `cores` cores (default: all; `pool_shape` gives one thread per core, and threads suffice
    because the factorizations spend their time in BLAS, outside the GIL); each finished layer is in
    the cache at once, and `progress` is called with its name. A cache with layer statistics
    fits those layers data-aware; with `compare_weight_only` the weight-only fit at the same
    ranks is also made (or read from the cache) and its errors reported beside. GIL-bound
    methods fit in worker processes: `processes` when given (left running), else started here
    when there are enough such fits.
    """
    check_plan(plan, analysis)
    cache = DecompositionCache(None, seed) if cache is None else cache
    if cache.seed != seed:
        raise ConfigError(
            f"the decomposition cache holds seed {cache.seed} but decompose was asked for seed "
            f"{seed}; pass the same seed to both"
        )
    new = copy.deepcopy(gm)
    layers = {entry.name: _checked_layer(new, analysis, entry) for entry in plan.layers}
    planned = plan.decomposed()
    n_workers, threads = pool_shape(len(planned), cores)

    baseline = cache.weight_only() if compare_weight_only and cache.statistics else None

    def fill(entry: LayerPlan) -> tuple[CachedBlock, bool, float, dict[str, float]]:
        start = time.perf_counter()
        method = get_method(entry.method)
        module = new.get_submodule(entry.name)
        layer, ranks = layers[entry.name], tuple(entry.ranks)
        compute = remote if method.gil_bound else None
        cached, computed = cache.lookup(module, layer, method, ranks, None, compute)
        compared: dict[str, float] = {}
        whitening = cache.whitening(layer)
        if baseline is not None and whitening is not None:
            plain, _ = baseline.lookup(module, layer, method, ranks, None, compute)
            block = method.build(layer, ranks)
            block.load_state_dict(plain.state)
            compared = fit_errors(module, block, whitening)
        return cached, computed, time.perf_counter() - start, compared

    filled: dict[str, tuple[CachedBlock, bool, float, dict[str, float]]] = {}

    def gil_bound_fill(entry: LayerPlan) -> bool:
        method, module = get_method(entry.method), new.get_submodule(entry.name)
        return method.gil_bound and not cache.has(module, layers[entry.name], method, entry.ranks)

    gil_bound_fills = sum(map(gil_bound_fill, planned))
    with layer_pool(n_workers, threads, gil_bound_fills, processes) as (pool, remote):
        futures = {pool.submit(fill, entry): entry.name for entry in largest_first(planned, layers)}
        try:
            for future in as_completed(futures):
                filled[futures[future]] = future.result()
                if progress is not None:
                    progress(futures[future])
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise

    rows = []
    for entry in plan.layers:
        layer = layers[entry.name]
        if not entry.decompose:
            rows.append(
                LayerReport(
                    entry.name,
                    entry.type,
                    None,
                    None,
                    layer.params,
                    layer.macs,
                    layer.params,
                    layer.macs,
                    None,
                    "skipped",
                    entry.reason,
                )
            )
            continue
        method = get_method(entry.method)
        ranks = tuple(entry.ranks)
        cached, computed, seconds, compared = filled[entry.name]
        extras = dict(cached.extras)
        original = new.get_submodule(entry.name)
        block = method.build(layer, ranks).to(original.weight.device, original.weight.dtype)
        block.load_state_dict(cached.state)
        new.set_submodule(entry.name, block)
        cost = method.cost(layer, ranks)
        rows.append(
            LayerReport(
                entry.name,
                entry.type,
                method.name,
                list(ranks),
                cost.params,
                cost.macs,
                layer.params,
                layer.macs,
                cached.rel_error,
                "decomposed",
                entry.reason,
                seconds=seconds,
                from_cache=not computed,
                output_error=extras.pop("output_error", None),
                weight_only_rel_error=compared.get("weight_error"),
                weight_only_output_error=compared.get("output_error"),
                extras=extras,
            )
        )
    return recompiled(new), DecompositionReport(rows)
