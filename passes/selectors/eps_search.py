"""eps-search: the protocol of Phan et al., "Stable Low-rank Tensor Decomposition for
Compression of Convolutional Neural Network" (ECCV 2020).

Per layer, binary-search the smallest rank whose single-layer replacement, followed by
recalibration, costs at most ε accuracy on the calibration split; layers that miss ε even at
their largest rank stay whole. With a budget, the ε-ranks' per-layer cost shares are scaled by
one factor until the model fits. Layers are searched in parallel by `search.workers` processes;
each process holds its evaluator in the module state its pool initializer sets up, so the model
and the calibration data cross the process boundary once per worker, not once per layer.
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import torch

from rankfold.passes.methods import Ranks
from rankfold.passes.plan import Choices, PlanDraft, allocate
from rankfold.passes.search import Evaluator, SearchContext, spawn_context
from rankfold.passes.selectors.base import Advance, Choice, PlanningContext, Selector


class EpsSearchSelector(Selector):
    name = "eps-search"
    summary = "per layer, the smallest rank costing at most ε accuracy on calibration data"
    needs_calibration = True
    uses_cache = True
    reads = frozenset(
        {"ranks.epsilon", "search.workers", "search.calib_samples", "search.bn_samples"}
    )

    def steps(self, draft: PlanDraft, context: PlanningContext) -> int:
        return len(draft.slots)

    def choose(self, draft: PlanDraft, context: PlanningContext, advance: Advance) -> Choice:
        return eps_search(SearchContext.of(draft, context), draft.policy.epsilon, advance)


_WORKER: dict[str, Any] = {}


def _init_worker(context: SearchContext) -> None:
    torch.set_num_threads(context.threads)
    _WORKER["context"] = context
    _WORKER["evaluator"] = context.evaluator()


def _search_layer(j: int, baseline: float, epsilon: float) -> dict[str, Any]:
    """Binary search of slot j's candidates for the smallest rank within ε of the baseline."""
    context: SearchContext = _WORKER["context"]
    evaluator: Evaluator = _WORKER["evaluator"]
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


def eps_search(context: SearchContext, epsilon: float, advance: Advance) -> Choice:
    """The ε protocol per layer, then (with a budget) one scale on the ε-ranks' cost shares."""
    start = time.perf_counter()
    draft = context.draft
    _init_worker(context)
    evaluator: Evaluator = _WORKER["evaluator"]
    original = evaluator.score(evaluator.original)
    # The baseline is the original after the same recalibration, so a drop measures the
    # replacement alone, not the recalibration's own effect.
    baseline = evaluator.evaluate({})["accuracy"]
    jobs = range(len(draft.slots))
    workers = min(context.search.workers, len(draft.slots))
    if workers > 1:
        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=spawn_context(),
            initializer=_init_worker,
            initargs=(context,),
        ) as pool:
            futures = [pool.submit(_search_layer, j, baseline, epsilon) for j in jobs]
            results = []
            for future in futures:
                results.append(future.result())
                advance(results[-1]["layer"])
    else:
        results = []
        for j in jobs:
            results.append(_search_layer(j, baseline, epsilon))
            advance(results[-1]["layer"])

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
            return last_within(costs[j], x * targets[j])

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
    return Choice(choices, reasons, report)


def last_within(costs: np.ndarray, limit: float) -> int:
    """The last index whose cost is within `limit` (0 when none is)."""
    within = np.flatnonzero(costs <= limit)
    return int(within[-1]) if len(within) else 0
