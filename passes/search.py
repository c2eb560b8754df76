"""Data-driven rank search: a decomposition cache, a trial evaluator, eps-search and PARS.

A trial is a choice of ranks for every budgeted layer. Evaluating one costs graph surgery from
cached blocks, BatchNorm recalibration (per-channel bias correction for BN-free models) and one
forward pass over a calibration split: every (layer weights, method, ranks, seed) decomposition is
computed once and kept on disk, keyed by a hash of the weights.

- eps-search (the protocol of Phan et al., "Stable Low-rank Tensor Decomposition for Compression
  of Convolutional Neural Network", ECCV 2020): per layer, binary-search the smallest rank whose
  single-layer replacement, followed by recalibration, costs at most ε accuracy; layers that miss
  ε even at their largest rank stay whole. With a budget, the ε-ranks' per-layer cost shares are
  scaled by one factor until the model fits.
- PARS (proxy-based automatic rank selection): Bayesian optimisation with optuna over per-layer
  budget shares. A trial samples one share per layer; `allocate` turns the shares into ranks that
  fit the budget (the largest common scale whose ranks fit, then single steps), so every sampled
  configuration is feasible and within a few tenths of a percent of the budget; the budget is a
  hard constraint by construction rather than a penalty. Shares lie in [0.25, 1] (log scale): a
  wider range mostly produced useless random trials. The sampler is optuna's GPSampler by
  default (it conditions on running trials, so parallel workers spread out); `sampler="tpe"`
  selects multivariate TPE with constant liar. Measured on ResNet-56 (54 shares, 3× MACs, 40
  trials each, same seeds): GP found an allocation 0.6 pt (proxy) above the best seed, TPE none,
  at the same wall time. The uniform allocation (every share 1) is enqueued first, then the
  energy and VBMF allocations where the method has unfoldings, so the search starts from the
  baselines it has to beat.
- Scale-out uses optuna's storages: any RDB URL (SQLite here, PostgreSQL across machines) or a
  journal file; `workers` processes share one study; a killed run resumes where it stopped.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import multiprocessing
import os
import re
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from threadpoolctl import threadpool_limits
from torch import fx, nn

from rankfold.passes.analysis import LayerInfo, ModelAnalysis
from rankfold.passes.blocks import FactorizedBlock
from rankfold.passes.core import (
    ConfigError,
    DataError,
    DecompositionError,
    RankfoldError,
    atomic_path,
)
from rankfold.passes.methods import Method, Ranks
from rankfold.passes.plan import PlanDraft, allocate
from rankfold.passes.recalibrate import correct_bias, has_batchnorm, recalibrate_bn

if TYPE_CHECKING:
    import optuna

    from rankfold.models import ArrayDataset, ModelSpec

CACHE_FORMAT = 1
SHARE_LOW = 0.25  # a layer keeps at least a quarter of the share of the most favoured one
HOST = socket.gethostname()
Progress = Callable[..., None]
Choices = list[Ranks | None]


class SearchConfig(BaseModel):
    """Settings of the data-driven selectors (eps-search, pars) and of the decomposition cache."""

    model_config = ConfigDict(extra="forbid")

    trials: int = Field(default=100, ge=1)
    sampler: Literal["gp", "tpe"] = "gp"
    proxy: Literal["accuracy", "agreement", "kd"] = "accuracy"
    storage: str | None = None  # optuna RDB URL, or journal:PATH / PATH.log for a journal file
    study_name: str | None = None
    workers: int = Field(default=1, ge=1)
    calib_samples: int = Field(default=1024, ge=1)  # images the proxy is scored on
    bn_samples: int = Field(default=512, ge=1)  # images BatchNorm is recalibrated on
    batch_size: int = Field(default=128, ge=1)
    cache_dir: Path | None = None  # default: $RANKFOLD_CACHE or ~/.cache/rankfold/decompositions
    timeout: float | None = Field(default=None, gt=0)  # seconds; no new trial starts after it


# --------------------------------------------------------------------------- calibration data


@dataclass
class Calibration:
    """What data-driven selectors need: a labelled proxy split and BatchNorm recalibration inputs.

    Inputs are normalised float tensors (N×C×H×W, or N×features); the two splits should be
    disjoint so the proxy is not scored on the images the statistics were taken from.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    bn_inputs: torch.Tensor
    batch_size: int = 128

    def __post_init__(self) -> None:
        if len(self.inputs) == 0 or len(self.bn_inputs) == 0:
            raise DataError("calibration data is empty; pass at least one labelled image")
        if self.labels.ndim != 1 or len(self.labels) != len(self.inputs):
            raise DataError(
                f"calibration has {len(self.inputs)} inputs but labels of shape "
                f"{tuple(self.labels.shape)}; pass one integer label per input"
            )
        if self.batch_size < 1:
            raise ConfigError(f"calibration batch_size must be >= 1, got {self.batch_size}")
        self.labels = self.labels.to(torch.int64)

    @classmethod
    def from_dataset(
        cls,
        data: ArrayDataset,
        spec: ModelSpec,
        samples: int = 1024,
        bn_samples: int = 512,
        batch_size: int = 128,
    ) -> Calibration:
        """The first `bn_samples` images recalibrate, the next `samples` score the proxy.

        A dataset smaller than both together is shared: the first `bn_samples` recalibrate, the
        last `samples` score.
        """
        from rankfold.models import normalize

        n = len(data)
        bn = slice(0, min(bn_samples, n))
        proxy = (
            slice(bn_samples, bn_samples + samples)
            if n >= samples + bn_samples
            else slice(max(n - samples, 0), n)
        )
        return cls(
            inputs=normalize(data.x[proxy], spec),
            labels=torch.from_numpy(data.y[proxy].copy()),
            bn_inputs=normalize(data.x[bn], spec),
            batch_size=batch_size,
        )

    def bn_batches(self) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.bn_inputs), self.batch_size):
            yield _fast_layout(self.bn_inputs[start : start + self.batch_size])

    def digest(self) -> str:
        h = hashlib.sha256()
        for tensor in (self.inputs, self.labels, self.bn_inputs):
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


def _fast_layout(x: torch.Tensor) -> torch.Tensor:
    # oneDNN's convolutions run about twice as fast on channels-last tensors on CPU (measured on
    # ResNet-56, 1 thread); results are the same up to float rounding.
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


# --------------------------------------------------------------------------- decomposition cache


def default_cache_dir() -> Path:
    """$RANKFOLD_CACHE, else $XDG_CACHE_HOME/rankfold/decompositions (~/.cache by default)."""
    if os.environ.get("RANKFOLD_CACHE"):
        return Path(os.environ["RANKFOLD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rankfold" / "decompositions"


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

    def __init__(self, directory: str | Path | None, seed: int = 0) -> None:
        self.directory = None if directory is None else Path(directory)
        self.seed = seed
        self.hits = 0
        self.misses = 0
        self.fill_seconds = 0.0
        self._memory: dict[str, CachedBlock] = {}

    def key(self, module: nn.Module, method: Method, ranks: Ranks) -> str:
        h = hashlib.sha256()
        for tensor in (module.weight, getattr(module, "bias", None)):
            if tensor is not None:
                array = tensor.detach().cpu().contiguous()
                h.update(f"{tuple(array.shape)}{array.dtype}".encode())
                h.update(array.numpy().tobytes())
        kind = f"{type(method).__module__}.{type(method).__qualname__}"
        h.update(f"|{method.name}|{kind}|{list(ranks)}|{self.seed}|{CACHE_FORMAT}".encode())
        return h.hexdigest()

    def get(self, module: nn.Module, layer: LayerInfo, method: Method, ranks: Ranks) -> CachedBlock:
        key = self.key(module, method, ranks)
        entry = self._load(key)
        if entry is not None:
            self.hits += 1
            return entry
        self.misses += 1
        start = time.perf_counter()
        block = method.build(layer, ranks).to(module.weight.device, module.weight.dtype)
        try:
            # Kernels are small: one BLAS thread each is fastest, and parallel workers share cores.
            with threadpool_limits(limits=1, user_api="blas"):
                filled = method.fill(block, module, self.seed)
        except (ValueError, ArithmeticError, RuntimeError) as exc:
            raise DecompositionError(
                f"decomposing layer '{layer.name}' ({method.name}, ranks {list(ranks)}) failed: "
                f"{str(exc).splitlines()[0]}; try another method or skip the layer"
            ) from None
        entry = CachedBlock(
            {k: v.detach().cpu().clone() for k, v in block.state_dict().items()},
            float(filled.rel_error),
            {k: float(v) for k, v in filled.extras.items()},
        )
        self.fill_seconds += time.perf_counter() - start
        self._store(key, entry)
        return entry

    def block(
        self, module: nn.Module, layer: LayerInfo, method: Method, ranks: Ranks
    ) -> FactorizedBlock:
        """A new block at `ranks`, filled from the cache (computed first when missing)."""
        entry = self.get(module, layer, method, ranks)
        block = method.build(layer, ranks).to(module.weight.device, module.weight.dtype)
        block.load_state_dict(entry.state)
        return block

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
            self._memory[key] = entry
            return
        payload = {"state": entry.state, "rel_error": entry.rel_error, "extras": entry.extras}
        with atomic_path(self._path(key)) as tmp:
            torch.save(payload, tmp)


# --------------------------------------------------------------------------- trial evaluation


def _replace(gm: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, child, module)


class Evaluator:
    """Builds a model from per-layer choices out of the cache, recalibrates it and scores it.

    Scores on the calibration proxy split: accuracy, top-1 agreement with the original model and
    the KL divergence from the original's predictive distribution (knowledge-distillation loss).
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        analysis: ModelAnalysis,
        calibration: Calibration,
        cache: DecompositionCache,
        reference_logits: torch.Tensor | None = None,
    ) -> None:
        self.original = copy.deepcopy(gm).eval()  # private: the layout change must not leak
        self.original.to(memory_format=torch.channels_last)
        self.analysis = analysis
        self.calibration = calibration
        self.cache = cache
        self.uses_bn = has_batchnorm(self.original)
        if reference_logits is None:
            reference_logits = self.logits(self.original)
        self.reference = reference_logits
        self.reference_log_probs = F.log_softmax(reference_logits.double(), dim=1)

    def build(self, choices: Mapping[str, tuple[Method, Ranks]]) -> fx.GraphModule:
        """A copy of the original with each named layer replaced by its cached block."""
        model = copy.deepcopy(self.original)
        for name, (method, ranks) in choices.items():
            original = self.original.get_submodule(name)
            block = self.cache.block(original, self.analysis.layer(name), method, ranks)
            _replace(model, name, block.to(memory_format=torch.channels_last))
        model.recompile()
        return model.eval()

    def recalibrate(self, model: nn.Module, names: Sequence[str]) -> None:
        """BatchNorm statistics on the recalibration split; bias correction without BatchNorm."""
        if self.uses_bn:
            recalibrate_bn(model, self.calibration.bn_batches())
        elif names:
            correct_bias(self.original, model, list(names), self.calibration.bn_batches())

    def logits(self, model: nn.Module) -> torch.Tensor:
        calibration = self.calibration
        outputs = []
        model.eval()
        with torch.no_grad():
            for start in range(0, len(calibration.inputs), calibration.batch_size):
                x = _fast_layout(calibration.inputs[start : start + calibration.batch_size])
                outputs.append(model(x).detach().float())
        return torch.cat(outputs)

    def score(self, model: nn.Module) -> dict[str, float]:
        logits = self.logits(model)
        predictions = logits.argmax(dim=1)
        log_probs = F.log_softmax(logits.double(), dim=1)
        kd = F.kl_div(log_probs, self.reference_log_probs, log_target=True, reduction="batchmean")
        return {
            "accuracy": float((predictions == self.calibration.labels).double().mean()),
            "agreement": float((predictions == self.reference.argmax(dim=1)).double().mean()),
            "kd": float(kd),
        }

    def evaluate(
        self, choices: Mapping[str, tuple[Method, Ranks]], raw: bool = False
    ) -> dict[str, float]:
        """Scores after recalibration; with `raw`, also the accuracy before it (`raw_accuracy`)."""
        model = self.build(choices)
        scores = {}
        if raw:
            scores["raw_accuracy"] = self.score(model)["accuracy"]
        self.recalibrate(model, list(choices))
        return {**self.score(model), **scores}


def proxy_value(scores: Mapping[str, float], proxy: str) -> float:
    """The number a search maximises: accuracy, agreement, or minus the KD loss."""
    return -scores["kd"] if proxy == "kd" else scores[proxy]


def slot_choices(draft: PlanDraft, choices: Choices) -> dict[str, tuple[Method, Ranks]]:
    return {
        slot.layer.name: (slot.method, ranks)
        for slot, ranks in zip(draft.slots, choices, strict=True)
        if ranks is not None
    }


def plan_totals(draft: PlanDraft, analysis: ModelAnalysis, choices: Choices) -> dict[str, int]:
    """Whole-model params and MACs with the slots at `choices` (other entries as drafted)."""
    totals = {"params": analysis.total_params, "macs": analysis.total_macs}
    for entry in draft.entries:
        if entry.decompose:
            layer = analysis.layer(entry.name)
            cost = _method_cost(entry.method, layer, tuple(entry.ranks))
            totals["params"] += cost.params - layer.params
            totals["macs"] += cost.macs - layer.macs
    for slot, ranks in zip(draft.slots, choices, strict=True):
        for metric in totals:
            totals[metric] += slot.cost(ranks, metric) - getattr(slot.layer, metric)
    return totals


def _method_cost(name: str, layer: LayerInfo, ranks: Ranks):
    from rankfold.passes.methods import get_method

    return get_method(name).cost(layer, ranks)


def _weights_digest(gm: nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in sorted(gm.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class SearchContext:
    """Everything a search process needs; pickled to worker processes."""

    gm: fx.GraphModule
    analysis: ModelAnalysis
    draft: PlanDraft
    calibration: Calibration
    search: SearchConfig
    seed: int  # the pipeline's seed: factorizations, and the sampler (offset per worker)
    threads: int
    reference_logits: torch.Tensor | None = None

    def cache(self) -> DecompositionCache:
        return DecompositionCache(self.search.cache_dir or default_cache_dir(), self.seed)

    def evaluator(self) -> Evaluator:
        evaluator = Evaluator(
            self.gm, self.analysis, self.calibration, self.cache(), self.reference_logits
        )
        self.reference_logits = evaluator.reference
        return evaluator


def _spawn_context() -> multiprocessing.context.SpawnContext:
    # Fresh interpreters: forking a process that has run torch's thread pools can hang.
    return multiprocessing.get_context("spawn")


# --------------------------------------------------------------------------- eps-search

_EPS_WORKER: dict[str, Any] = {}


def _eps_init(context: SearchContext) -> None:
    torch.set_num_threads(context.threads)
    _EPS_WORKER["context"] = context
    _EPS_WORKER["evaluator"] = context.evaluator()


def _eps_layer(j: int, baseline: float, epsilon: float) -> dict[str, Any]:
    """Binary search of slot j's candidates for the smallest rank within ε of the baseline."""
    context: SearchContext = _EPS_WORKER["context"]
    evaluator: Evaluator = _EPS_WORKER["evaluator"]
    slot = context.draft.slots[j]
    ladder = slot.candidates()
    tried: dict[int, float] = {}

    def drop(i: int) -> float:
        if i not in tried:
            scores = evaluator.evaluate({slot.layer.name: (slot.method, ladder[i])})
            tried[i] = baseline - scores["accuracy"]
        return tried[i]

    start = time.perf_counter()
    top = len(ladder) - 1
    chosen: int | None = None
    # A tolerance below one image: accuracies are multiples of 1/N.
    tolerance = 0.5 / len(context.calibration.labels)
    if drop(top) <= epsilon + tolerance:
        low, high = 0, top  # invariant: drop(high) <= ε
        while low < high:
            mid = (low + high) // 2
            if drop(mid) <= epsilon + tolerance:
                high = mid
            else:
                low = mid + 1
        chosen = high
    return {
        "layer": slot.layer.name,
        "ranks": None if chosen is None else list(ladder[chosen]),
        "index": chosen,
        "drop": tried[top if chosen is None else chosen],
        "evaluations": [{"ranks": list(ladder[i]), "drop": d} for i, d in sorted(tried.items())],
        "seconds": time.perf_counter() - start,
    }


def eps_search(
    context: SearchContext, epsilon: float, progress: Progress | None = None
) -> tuple[Choices, list[str], dict[str, Any]]:
    """The ε protocol per layer, then (with a budget) one scale on the ε-ranks' cost shares."""
    start = time.perf_counter()
    draft = context.draft
    _eps_init(context)
    evaluator: Evaluator = _EPS_WORKER["evaluator"]
    original = evaluator.score(evaluator.original)
    # The baseline is the original after the same recalibration, so a drop measures the
    # replacement alone, not the recalibration's own effect.
    baseline = evaluator.evaluate({})["accuracy"]
    jobs = range(len(draft.slots))
    workers = min(context.search.workers, len(draft.slots))
    if workers > 1:
        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=_spawn_context(),
            initializer=_eps_init,
            initargs=(context,),
        ) as pool:
            futures = [pool.submit(_eps_layer, j, baseline, epsilon) for j in jobs]
            results = []
            for future in futures:
                results.append(future.result())
                if progress is not None:
                    progress(results[-1]["layer"])
    else:
        results = []
        for j in jobs:
            results.append(_eps_layer(j, baseline, epsilon))
            if progress is not None:
                progress(results[-1]["layer"])

    eps_choices: Choices = [None if r["ranks"] is None else tuple(r["ranks"]) for r in results]
    reasons = []
    for r in results:
        if r["ranks"] is None:
            reasons.append(
                f"eps-search: kept whole; even its largest candidate costs {r['drop']:.2%} "
                f"accuracy > ε {epsilon:.2%}"
            )
        else:
            reasons.append(
                f"eps-search: smallest rank within ε {epsilon:.2%} accuracy "
                f"(drop {r['drop']:.2%} on the calibration split)"
            )
    choices, scale = eps_choices, None
    budget = draft.budget
    if budget is not None:
        metric = budget.metric
        ladders: list[list[Ranks | None]] = [
            [None] if ranks is None else list(slot.candidates())
            for slot, ranks in zip(draft.slots, eps_choices)
        ]
        costs = [np.array([s.cost(o, metric) for o in lad]) for s, lad in zip(draft.slots, ladders)]
        targets = [s.cost(r, metric) for s, r in zip(draft.slots, eps_choices)]

        def level(j: int, x: float) -> int:
            return _last_within(costs[j], x * targets[j])

        high = max(s.cost(None, metric) / max(t, 1e-12) for s, t in zip(draft.slots, targets))
        indices, scale = allocate(draft, ladders, level, 0.0, max(high, 1.0))
        choices = [lad[i] for lad, i in zip(ladders, indices)]
        eps_total = budget.fixed + sum(targets)
        reasons = [
            reason
            if ranks is None
            else f"{reason}; scaled to {budget.reduction:g}× {metric} "
            f"(ε-ranks give {budget.total / max(eps_total, 1e-12):.2f}×)"
            for reason, ranks in zip(reasons, choices)
        ]
    report = {
        "selector": "eps-search",
        "epsilon": epsilon,
        "original_accuracy": original["accuracy"],
        "baseline_accuracy": baseline,
        "calibration": {
            "proxy_samples": len(context.calibration.labels),
            "bn_samples": len(context.calibration.bn_inputs),
        },
        "budget_scale": scale,
        "evaluations": sum(len(r["evaluations"]) for r in results),
        "layers": results,
        "workers": workers,
        "seconds": time.perf_counter() - start,
    }
    return choices, reasons, report


def _last_within(costs: np.ndarray, limit: float) -> int:
    """The last index whose cost is within `limit` (0 when none is)."""
    within = np.flatnonzero(costs <= limit)
    return int(within[-1]) if len(within) else 0


# --------------------------------------------------------------------------- PARS


class ParsSpace:
    """Per-layer budget shares → ranks within the budget. Options: the candidates, then whole."""

    def __init__(self, draft: PlanDraft) -> None:
        if draft.budget is None:
            raise ConfigError(
                "--select pars searches under a budget; give --macs-reduction or --params-reduction"
            )
        self.draft = draft
        metric = draft.budget.metric
        self.names = [slot.layer.name for slot in draft.slots]
        self.ladders: list[list[Ranks | None]] = [
            [*slot.candidates(), None] for slot in draft.slots
        ]
        self.costs = [
            np.array([slot.cost(option, metric) for option in ladder])
            for slot, ladder in zip(draft.slots, self.ladders)
        ]
        self.sizes = [slot.cost(None, metric) for slot in draft.slots]

    def choices(self, shares: Sequence[float]) -> Choices:
        def level(j: int, x: float) -> int:
            return _last_within(self.costs[j], x * shares[j] * self.sizes[j])

        indices, _ = allocate(self.draft, self.ladders, level, 0.0, 1.0 / min(shares))
        return [ladder[i] for ladder, i in zip(self.ladders, indices)]

    def shares_of(self, choices: Choices) -> dict[str, float]:
        """Shares approximating `choices` (a seed trial): each layer's kept fraction, rescaled."""
        metric = self.draft.budget.metric
        keep = [
            slot.cost(ranks, metric) / size
            for slot, ranks, size in zip(self.draft.slots, choices, self.sizes)
        ]
        top = max(keep)
        return {name: min(max(k / top, SHARE_LOW), 1.0) for name, k in zip(self.names, keep)}


def open_storage(url: str | None) -> optuna.storages.BaseStorage | None:
    """An optuna storage from a URL: RDB (sqlite:///…, postgresql://…) or a journal file."""
    import optuna

    if url is None:
        return None
    journal = url.removeprefix("journal:") if url.startswith("journal:") else None
    if journal is None and url.endswith((".log", ".journal", ".jsonl")) and "://" not in url:
        journal = url
    try:
        if journal is not None:
            path = Path(journal)
            path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(
                optuna.storages.journal.JournalFileBackend(str(path))
            )
        if "://" not in url:
            raise ValueError("not a URL")
        # The heartbeat marks trials of a killed process as failed, so a resumed run redoes them.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=120)
    except (ValueError, ImportError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"cannot open search storage '{url}' ({first}); give an optuna URL such as "
            "sqlite:///search.db or postgresql://user@host/db, or journal:search.log"
        ) from None
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy's errors have no common base here
        first = str(exc).splitlines()[0]
        raise ConfigError(
            f"cannot open search storage '{url}' ({first}); check the URL and that the database "
            "and its driver are available"
        ) from None


def _fingerprint(context: SearchContext) -> str:
    """What makes two runs the same study: model weights, plan space, budget, proxy, data."""
    draft = context.draft
    description = {
        "model": draft.model_name,
        "weights": _weights_digest(context.gm),
        "policy": draft.policy.model_dump(mode="json", exclude={"select"}),
        "slots": [[s.layer.name, s.method.name] for s in draft.slots],
        "proxy": context.search.proxy,
        "calibration": context.calibration.digest(),
        "seed": context.seed,
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


WORKER_ATTR = "rankfold_worker:"


def register_worker(study: optuna.Study) -> None:
    """Record this process in the study, so its orphaned trials can be told from live ones."""
    study.set_user_attr(f"{WORKER_ATTR}{HOST}:{os.getpid()}", time.time())


def _others_all_dead_here(study: optuna.Study) -> bool:
    """Whether every other process that ever worked on the study ran on this host and is gone."""
    for key in study.user_attrs:
        if not key.startswith(WORKER_ATTR):
            continue
        host, _, pid = key.removeprefix(WORKER_ATTR).rpartition(":")
        if int(pid) == os.getpid() and host == HOST:
            continue
        if host != HOST or _alive(int(pid)):
            return False
    return True


def fail_dead_trials(study: optuna.Study) -> int:
    """Mark RUNNING trials of dead processes on this host as FAIL (journal files have no
    heartbeat); RDB storages also fail stale trials by heartbeat. Returns how many were failed.

    A trial is RUNNING from the moment optuna creates it, before its sampler has run and before
    the objective can record the process id; a process killed in that window leaves a trial
    without one. Such trials are failed when no other registered worker can still own them.
    """
    import optuna
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    failed = 0
    orphans_are_dead: bool | None = None
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        if "pid" in attrs:
            dead = attrs.get("host") == HOST and not _alive(int(attrs["pid"]))
        else:
            if orphans_are_dead is None:
                orphans_are_dead = _others_all_dead_here(study)
            dead = orphans_are_dead
        if dead:
            try:
                study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
                failed += 1
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another process got there first
    return failed


def _sampler(search: SearchConfig, seed: int, worker: int) -> optuna.samplers.BaseSampler:
    import optuna

    seed += 1000 * worker  # workers must not draw the same random startup trials
    startup = min(10, max(search.trials // 5, 1))
    if search.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    return optuna.samplers.TPESampler(
        seed=seed,
        n_startup_trials=startup,
        multivariate=True,
        constant_liar=True,
    )


class ParsRun:
    """One process's part of a PARS study: sample shares, allocate, evaluate, tell."""

    def __init__(self, context: SearchContext, storage_url: str | None, study_name: str) -> None:
        self.context = context
        self.space = ParsSpace(context.draft)
        self.storage_url = storage_url
        self.study_name = study_name
        self.evaluator: Evaluator | None = None

    def optimize(
        self,
        worker: int,
        study: optuna.Study | None = None,
        on_trial: Callable[[optuna.Study], None] | None = None,
    ) -> None:
        """Run trials until the study holds `trials` complete ones (or the timeout passes).

        `study` is the parent's own study object (its sampler seeded for worker 0); worker
        processes load the study from the storage URL with their own sampler.
        """
        import optuna
        from optuna.trial import TrialState

        search = self.context.search
        if study is None:
            study = optuna.load_study(
                study_name=self.study_name,
                storage=open_storage(self.storage_url),
                sampler=_sampler(search, self.context.seed, worker),
            )
        if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= search.trials:
            return
        if self.evaluator is None:
            self.evaluator = self.context.evaluator()
        target = search.trials

        def objective(trial: optuna.Trial) -> float:
            trial.set_user_attr("host", HOST)
            trial.set_user_attr("pid", os.getpid())
            trial.set_user_attr("worker", worker)
            if self._surplus(study, trial.number, target):
                trial.set_user_attr("surplus", True)
                study.stop()
                raise optuna.TrialPruned()
            start = time.perf_counter()
            misses = self.evaluator.cache.misses
            shares = [
                trial.suggest_float(name, SHARE_LOW, 1.0, log=True) for name in self.space.names
            ]
            choices = self.space.choices(shares)
            scores = self.evaluator.evaluate(slot_choices(self.context.draft, choices))
            totals = plan_totals(self.context.draft, self.context.analysis, choices)
            for key, value in {**scores, **totals}.items():
                trial.set_user_attr(key, value)
            trial.set_user_attr("kept_whole", sum(c is None for c in choices))
            trial.set_user_attr("decompositions", self.evaluator.cache.misses - misses)
            trial.set_user_attr("seconds", time.perf_counter() - start)
            return proxy_value(scores, search.proxy)

        def enough(study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
            states = (TrialState.COMPLETE, TrialState.RUNNING)
            if len(study.get_trials(deepcopy=False, states=states)) >= target:
                study.stop()
            if on_trial is not None:
                on_trial(study)

        fail_dead_trials(study)
        register_worker(study)
        study.optimize(objective, n_trials=None, timeout=search.timeout, callbacks=[enough])

    @staticmethod
    def _surplus(study: optuna.Study, number: int, target: int) -> bool:
        """True when `target` earlier trials already ran or run: this one would be one too many.

        Trial numbers are assigned atomically by the storage, so of two workers that start the
        last trial at once, exactly one sees the other's lower number and steps back.
        """
        from optuna.trial import TrialState

        states = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
        earlier = [t for t in study.get_trials(deepcopy=False, states=states) if t.number < number]
        return len(earlier) >= target


def _pars_worker(
    context: SearchContext, storage_url: str, study_name: str, worker: int, error_file: str
) -> None:
    import optuna

    try:
        torch.set_num_threads(context.threads)
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        ParsRun(context, storage_url, study_name).optimize(worker)
    except BaseException as exc:
        Path(error_file).write_text(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
        raise


def pars_search(
    context: SearchContext,
    seeds: Sequence[tuple[str, Choices]] = (),
    progress: Progress | None = None,
) -> tuple[Choices, list[str], dict[str, Any]]:
    """Bayesian search over per-layer budget shares; returns the best trial's ranks and a report.

    `seeds` are (label, choices) configurations enqueued before the first trial (the uniform
    allocation always is, first).
    """
    import optuna
    from optuna.trial import TrialState

    # Optuna's warnings (e.g. about optional speed-ups) would break the CLI's progress display.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    start = time.perf_counter()
    search, draft = context.search, context.draft
    space = ParsSpace(draft)
    fingerprint = _fingerprint(context)
    study_name = search.study_name or f"rankfold-{draft.model_name}-{fingerprint[:12]}"
    with tempfile.TemporaryDirectory(prefix="rankfold-search-") as scratch:
        storage_url = search.storage
        if storage_url is None and search.workers > 1:
            storage_url = f"journal:{Path(scratch) / 'study.log'}"  # processes need a shared one
        storage = open_storage(storage_url)
        study = optuna.create_study(
            storage=storage,
            sampler=_sampler(search, context.seed, 0),
            study_name=study_name,
            direction="maximize",
            load_if_exists=True,
        )
        known = study.user_attrs.get("rankfold_fingerprint")
        if known is None:
            study.set_user_attr("rankfold_fingerprint", fingerprint)
        elif known != fingerprint:
            raise ConfigError(
                f"study '{study_name}' in {_redacted(search.storage)} was made for another model, "
                "budget, proxy or calibration data; choose another --study-name or storage"
            )
        if not study.get_trials(deepcopy=False):
            uniform = {name: 1.0 for name in space.names}
            study.enqueue_trial(uniform, user_attrs={"seed": "uniform"})
            for label, choices in list(seeds)[: search.trials - 1]:
                study.enqueue_trial(space.shares_of(choices), user_attrs={"seed": label})
        resumed = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

        reported = [resumed]

        def report_progress(current: optuna.Study) -> None:
            done = len(current.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            if progress is not None:
                for _ in range(max(done - reported[0], 0)):
                    progress("trial")
            reported[0] = max(done, reported[0])

        children = []
        errors = []
        if search.workers > 1:
            ctx = _spawn_context()
            for worker in range(1, search.workers):
                error_file = Path(scratch) / f"worker{worker}.err"
                process = ctx.Process(
                    target=_pars_worker,
                    args=(context, storage_url, study_name, worker, str(error_file)),
                    daemon=True,
                )
                process.start()
                children.append(process)
                errors.append(error_file)
        try:
            run = ParsRun(context, storage_url, study_name)
            run.optimize(0, study=study, on_trial=report_progress)
            while any(process.is_alive() for process in children):
                for process in children:
                    process.join(timeout=1.0)
                report_progress(study)
        finally:
            for process in children:  # only on an error or interrupt in this process
                if process.is_alive():
                    process.terminate()
                    process.join()
        for process, error_file in zip(children, errors):
            if process.exitcode != 0:
                reason = error_file.read_text() if error_file.is_file() else "no message"
                raise RankfoldError(
                    f"search worker {process.pid} failed ({reason}); fix the cause and rerun "
                    "with the same --storage to resume"
                )
        report_progress(study)
        trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise RankfoldError(
            "the search finished no trial; raise --timeout or check the calibration data"
        )
    best = max(complete, key=lambda t: (t.value, -t.number))
    choices = space.choices([best.params[name] for name in space.names])
    budget = draft.budget
    reasons = [
        f"pars: trial {best.number} of {len(complete)} ({search.sampler}, proxy "
        f"{search.proxy} {best.value:.4f}) for {budget.reduction:g}× {budget.metric}"
        for _ in choices
    ]
    table = [_trial_row(t) for t in trials if not t.user_attrs.get("surplus")]
    report = {
        "selector": "pars",
        "sampler": search.sampler,
        "proxy": search.proxy,
        "study_name": study_name,
        "storage": _redacted(search.storage),
        "workers": search.workers,
        "trials_requested": search.trials,
        "trials_complete": len(complete),
        "trials_resumed": resumed,
        "budget": {
            "metric": budget.metric,
            "reduction": budget.reduction,
            "goal": budget.goal,
            "total": budget.total,
        },
        "calibration": {
            "proxy_samples": len(context.calibration.labels),
            "bn_samples": len(context.calibration.bn_inputs),
            "recalibration": "batchnorm" if has_batchnorm(context.gm) else "bias correction",
        },
        "best": _trial_row(best),
        "pareto": pareto_front(table),
        "decompositions_computed": int(sum(r.get("decompositions") or 0 for r in table)),
        "table": table,
        "seconds": time.perf_counter() - start,
    }
    return choices, reasons, report


def _redacted(url: str | None) -> str | None:
    """The storage URL without its password (reports are shared; credentials are not)."""
    return None if url is None else re.sub(r"(//[^:/@]+):[^@/]*@", r"\1:***@", url)


def _trial_row(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    attrs = trial.user_attrs
    keys = ("accuracy", "agreement", "kd", "macs", "params", "kept_whole", "decompositions")
    row: dict[str, Any] = {
        "trial": trial.number,
        "state": trial.state.name,
        "proxy": trial.value,
        **{key: attrs.get(key) for key in keys},
        "seconds": attrs.get("seconds"),
        "worker": attrs.get("worker"),
        "seed": attrs.get("seed"),
    }
    return json.loads(json.dumps(row, default=float))


def pareto_front(table: Sequence[Mapping[str, Any]]) -> list[int]:
    """Trials no other trial beats on both fewer MACs and a higher proxy, by increasing MACs."""
    done = sorted(
        (r for r in table if r["state"] == "COMPLETE" and r["proxy"] is not None),
        key=lambda r: (r["macs"], -r["proxy"]),
    )
    front, best = [], -math.inf
    for row in done:
        if row["proxy"] > best:
            front.append(row["trial"])
            best = row["proxy"]
    return front


def plot_search(report: Mapping[str, Any], path: str | Path) -> Path:
    """Proxy vs MACs of every trial, the Pareto front, the best trial and the budget."""
    from matplotlib.figure import Figure

    rows = [r for r in report["table"] if r["state"] == "COMPLETE"]
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    ax.scatter(
        [r["macs"] / 1e6 for r in rows],
        [r["proxy"] for r in rows],
        s=14,
        color="#9aa5b1",
        label=f"trials ({len(rows)})",
    )
    by_number = {r["trial"]: r for r in rows}
    front = [by_number[n] for n in report["pareto"] if n in by_number]
    ax.plot(
        [r["macs"] / 1e6 for r in front],
        [r["proxy"] for r in front],
        "-o",
        color="#d1495b",
        markersize=4,
        label="Pareto front",
    )
    seeds = [r for r in rows if r.get("seed")]
    if seeds:
        ax.scatter(
            [r["macs"] / 1e6 for r in seeds],
            [r["proxy"] for r in seeds],
            marker="s",
            s=36,
            color="#edae49",
            label="seeded (" + ", ".join(str(r["seed"]) for r in seeds) + ")",
        )
    best = report["best"]
    ax.scatter(
        [best["macs"] / 1e6], [best["proxy"]], marker="*", s=160, color="#2b7bba", label="best"
    )
    ax.axvline(report["budget"]["goal"] / 1e6, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel("MACs per sample (millions); dashed: budget")
    ax.set_ylabel(f"proxy ({report['proxy']}, after recalibration)")
    ax.set_title(f"PARS {report['sampler']}: {report['trials_complete']} trials")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return Path(path)


__all__ = [
    "Calibration",
    "DecompositionCache",
    "Evaluator",
    "ParsSpace",
    "SearchConfig",
    "SearchContext",
    "default_cache_dir",
    "eps_search",
    "fail_dead_trials",
    "open_storage",
    "pareto_front",
    "pars_search",
    "plot_search",
    "proxy_value",
]
