"""The decomposition cache: every (layer weights, method and its settings, ranks, seed, input
statistics) factorization is computed once and kept, on disk or in memory.

Rank search and the final decomposition share it, so a block PARS or eps-search evaluated is not
factorized again when the chosen plan is applied (`rankfold.passes.surgery.decompose(cache=)`).
A cache made with layer statistics fits those layers data-aware (`rankfold.passes.statistics`);
their keys carry the statistics' fingerprint, so data-aware and weight-only entries never mix.
The statistics themselves are cached beside the blocks (`load_statistics`, `store_statistics`).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from rankfold.passes.analysis import LayerInfo
from rankfold.passes.blocks import FactorizedBlock, block_kernel, kernel_of
from rankfold.passes.core import DecompositionError, atomic_path
from rankfold.passes.methods import Method, Ranks
from rankfold.passes.statistics import LayerStatistics, Whitening, whitened_fill

CACHE_FORMAT = 4  # 2: the key includes the method's settings; 3: cp-lrf's stages equalized;
# 4: Tucker-2 by extrapolated HOOI


def default_cache_dir() -> Path:
    """$RANKFOLD_CACHE, else $XDG_CACHE_HOME/rankfold/decompositions (~/.cache by default)."""
    if os.environ.get("RANKFOLD_CACHE"):
        return Path(os.environ["RANKFOLD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rankfold" / "decompositions"


@contextmanager
def compute_threads(threads: int | None) -> Iterator[None]:
    """BLAS and torch intra-op threads limited to `threads` (None: left as they are)."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(before)


@dataclass
class CachedBlock:
    state: dict[str, torch.Tensor]
    rel_error: float
    extras: dict[str, float]


class DecompositionCache:
    """Filled blocks keyed by (layer weights, method, ranks, seed): computed once, then loaded.

    With a directory, entries are files written atomically, so processes can share one folder
    (two processes computing the same entry write the same bytes); without one, they live in
    memory for this process only.
    """

    def __init__(
        self,
        directory: str | Path | None,
        seed: int = 0,
        statistics: LayerStatistics | None = None,
    ) -> None:
        self.directory = None if directory is None else Path(directory)
        self.seed = seed
        self.statistics = statistics
        self.hits = 0
        self.misses = 0
        self.fill_seconds = 0.0
        self._memory: dict[str, CachedBlock] = {}
        self._lock = threading.Lock()  # counters and memory are shared by decompose's threads

    def __getstate__(self) -> dict:
        # Search workers receive the cache by pickling; a lock does not travel, a new one does.
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def weight_only(self) -> DecompositionCache:
        """The same store without statistics: the weight-only fits, for comparison."""
        twin = DecompositionCache(self.directory, self.seed)
        twin._memory = self._memory  # keys differ, so one dict serves both
        return twin

    def whitening(self, layer: LayerInfo) -> Whitening | None:
        return None if self.statistics is None else self.statistics.whitening(layer.name)

    def key(
        self, module: nn.Module, method: Method, ranks: Ranks, whitening: Whitening | None = None
    ) -> str:
        h = hashlib.sha256()
        for tensor in (module.weight, getattr(module, "bias", None)):
            if tensor is not None:
                array = tensor.detach().cpu().contiguous()
                h.update(f"{tuple(array.shape)}{array.dtype}".encode())
                h.update(array.numpy().tobytes())
        kind = f"{type(method).__module__}.{type(method).__qualname__}"
        settings = json.dumps(method.settings(), sort_keys=True)
        h.update(
            f"|{method.name}|{kind}|{settings}|{list(ranks)}|{self.seed}|{CACHE_FORMAT}".encode()
        )
        if whitening is not None:
            h.update(f"|statistics:{whitening.fingerprint}".encode())
        return h.hexdigest()

    def has(self, module: nn.Module, layer: LayerInfo, method: Method, ranks: Ranks) -> bool:
        """Whether the entry is stored (without loading it)."""
        key = self.key(module, method, ranks, self.whitening(layer))
        if self.directory is None:
            return key in self._memory
        return self._path(key).is_file()

    def get(
        self,
        module: nn.Module,
        layer: LayerInfo,
        method: Method,
        ranks: Ranks,
        threads: int | None = 1,
    ) -> CachedBlock:
        return self.lookup(module, layer, method, ranks, threads)[0]

    def lookup(
        self,
        module: nn.Module,
        layer: LayerInfo,
        method: Method,
        ranks: Ranks,
        threads: int | None = 1,
        compute: Fill | None = None,
    ) -> tuple[CachedBlock, bool]:
        """The entry and whether it was computed now. The fill runs on `threads` BLAS/torch
        threads (default 1: rank search runs many small fills side by side; None: the caller
        set them, as `decompose`'s pool does), through `compute` (default `fill_entry` here;
        `decompose` sends GIL-bound methods to worker processes)."""
        whitening = self.whitening(layer)
        key = self.key(module, method, ranks, whitening)
        entry = self._load(key)
        if entry is not None:
            with self._lock:
                self.hits += 1
            return entry, False
        start = time.perf_counter()
        if compute is None:
            with compute_threads(threads):
                entry = fill_entry(module, layer, method, ranks, self.seed, whitening)
        else:
            entry = compute(module, layer, method, ranks, self.seed, whitening)
        # Stored as soon as it is computed: a killed run resumes from the finished layers.
        self._store(key, entry)
        with self._lock:
            self.misses += 1
            self.fill_seconds += time.perf_counter() - start
        return entry, True

    def block(
        self, module: nn.Module, layer: LayerInfo, method: Method, ranks: Ranks
    ) -> tuple[FactorizedBlock, CachedBlock]:
        """A new block at `ranks` filled from the cache (computed first when missing), and the
        cache entry (its error and extras)."""
        entry = self.get(module, layer, method, ranks)
        block = method.build(layer, ranks).to(module.weight.device, module.weight.dtype)
        block.load_state_dict(entry.state)
        return block, entry

    def _statistics_path(self, key: str) -> Path:
        return self.directory / "statistics" / f"{key}.pt"

    def load_statistics(self, key: str, damping: float) -> LayerStatistics | None:
        """Statistics stored under `key` (see `statistics_key`), None when absent or damaged."""
        if self.directory is None or not self._statistics_path(key).is_file():
            return None
        try:
            payload = torch.load(self._statistics_path(key), map_location="cpu", weights_only=True)
            return LayerStatistics.from_payload(payload, damping)
        except Exception:  # noqa: BLE001 - damaged statistics are collected again
            return None

    def store_statistics(self, key: str, statistics: LayerStatistics) -> None:
        if self.directory is None:
            return
        with atomic_path(self._statistics_path(key)) as tmp:
            torch.save(statistics.to_payload(), tmp)

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.pt"

    def _load(self, key: str) -> CachedBlock | None:
        if self.directory is None:
            return self._memory.get(key)
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            return CachedBlock(data["state"], float(data["rel_error"]), dict(data["extras"]))
        except Exception:  # noqa: BLE001 - a damaged entry is recomputed and overwritten
            return None

    def _store(self, key: str, entry: CachedBlock) -> None:
        if self.directory is None:
            with self._lock:
                self._memory[key] = entry
            return
        payload = {"state": entry.state, "rel_error": entry.rel_error, "extras": entry.extras}
        with atomic_path(self._path(key)) as tmp:
            torch.save(payload, tmp)


def fill_entry(
    module: nn.Module,
    layer: LayerInfo,
    method: Method,
    ranks: Ranks,
    seed: int,
    whitening: Whitening | None,
) -> CachedBlock:
    """The work behind a cache miss: `module` factorized into a new block at `ranks`, fitted to
    its output in the `whitening` metric when given (a module-level function, so that worker
    processes can run it)."""
    block = method.build(layer, ranks).to(module.weight.device, module.weight.dtype)
    try:
        if whitening is None:
            filled = method.fill(block, module, seed)
        else:
            filled = whitened_fill(method, block, module, whitening, seed)
            filled.extras.update(fit_errors(module, block, whitening))
            filled.rel_error = filled.extras.pop("weight_error")
    except (ValueError, ArithmeticError, RuntimeError) as exc:
        raise DecompositionError(
            f"decomposing layer '{layer.name}' ({method.name}, ranks {list(ranks)}) failed: "
            f"{str(exc).splitlines()[0]}; try other ranks or method, or skip the layer"
        ) from None
    return CachedBlock(
        {k: v.detach().cpu().clone() for k, v in block.state_dict().items()},
        float(filled.rel_error),
        {k: float(v) for k, v in filled.extras.items()},
    )


Fill = Callable[[nn.Module, LayerInfo, Method, Ranks, int, "Whitening | None"], CachedBlock]


def fit_errors(module: nn.Module, block: nn.Module, whitening: Whitening) -> dict[str, float]:
    """The block's relative weight error and relative output error on the layer's statistics."""
    kernel = kernel_of(module)
    approx = block_kernel(block).reshape(kernel.shape)
    weight_error = np.linalg.norm(kernel - approx) / max(np.linalg.norm(kernel), 1e-300)
    return {
        "weight_error": float(weight_error),
        "output_error": whitening.output_error(kernel, approx),
    }
