"""error: per layer, the smallest candidate whose decomposition's relative reconstruction
error is within a bound (decompositions come from the cache, so any method works)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import fx

from rankfold.passes.methods import Ranks
from rankfold.passes.plan import ALLOCATE_EVALUATIONS, PlanDraft, allocate
from rankfold.passes.search import DecompositionCache
from rankfold.passes.search.cache import Fill
from rankfold.passes.selectors.base import Advance, Choice, PlanningContext, Selector
from rankfold.passes.surgery import FillProcesses, layer_pool, pool_shape


class ErrorSelector(Selector):
    name = "error"
    summary = "smallest ranks within a relative reconstruction error per layer (--rel-error)"
    uses_cache = True

    def steps(self, draft: PlanDraft, context: PlanningContext) -> int:
        # With a budget: each evaluation of all layers at one bound; else each layer searched.
        return ALLOCATE_EVALUATIONS if draft.budget is not None else len(draft.slots)

    def choose(self, draft: PlanDraft, context: PlanningContext, advance: Advance) -> Choice:
        return error_choice(
            draft, context.gm, draft.policy.rel_error, context.cache, advance, context.processes
        )


def error_choice(
    draft: PlanDraft,
    gm: fx.GraphModule,
    rel_error: float,
    cache: DecompositionCache,
    advance: Advance | None = None,
    processes: FillProcesses | None = None,
) -> Choice:
    """Smallest candidate whose relative reconstruction error is within the bound, per layer;
    with a budget, the common bound that fits it. Errors are taken as non-increasing in the
    candidate (true for SVD and Tucker-2 up to ALS noise), so each layer is a binary search.
    Without a budget, a method with its own rule (`Method.ranks_within_error`, e.g. cp-lrf's
    LRF-CPD) picks its layers' ranks itself.

    Layers are searched side by side, one single-threaded thread per core (as `decompose` fills
    them), GIL-bound methods' fits in worker processes (`processes` when given): each layer's
    binary search is its own."""
    workers, threads = pool_shape(len(draft.slots))
    # Every bisection step can miss the cache in every layer: enough fits to pay for processes.
    gil_bound = 2 * workers if any(slot.method.gil_bound for slot in draft.slots) else 0
    with layer_pool(workers, threads, gil_bound, processes) as (pool, remote):
        return _error_choice(
            draft, gm, rel_error, cache, pool.map, remote, advance or (lambda *_: None)
        )


def _error_choice(
    draft: PlanDraft,
    gm: fx.GraphModule,
    rel_error: float,
    cache: DecompositionCache,
    mapper: Callable[[Callable[[int], object], Iterable[int]], Iterable[object]],
    remote: Fill | None,
    advance: Advance,
) -> Choice:
    ladders = [slot.candidates() for slot in draft.slots]
    errors: dict[tuple[int, int], float] = {}  # each layer's keys are written by one thread

    def error(j: int, i: int) -> float:
        if (j, i) not in errors:
            slot = draft.slots[j]
            module = gm.get_submodule(slot.layer.name)
            compute = remote if slot.method.gil_bound else None
            entry, _ = cache.lookup(module, slot.layer, slot.method, ladders[j][i], None, compute)
            errors[j, i] = entry.rel_error
        return errors[j, i]

    def smallest_within(j: int, bound: float) -> int | None:
        top = len(ladders[j]) - 1
        if error(j, top) > bound:
            return None
        low, high = 0, top
        while low < high:
            mid = (low + high) // 2
            if error(j, mid) <= bound:
                high = mid
            else:
                low = mid + 1
        return high

    def level(j: int, x: float) -> int:
        found = smallest_within(j, 1.0 - x)  # x = 1 - bound: larger x, larger ranks
        return len(ladders[j]) - 1 if found is None else found

    budget = draft.budget
    own: dict[int, Ranks | str] = {}
    if budget is None:
        for j, slot in enumerate(draft.slots):
            module = gm.get_submodule(slot.layer.name)
            answer = slot.method.ranks_within_error(slot.layer, module, rel_error, cache.seed)
            if answer is not None:
                own[j] = answer

        def own_or_smallest(j: int) -> int | None:
            return None if j in own else smallest_within(j, rel_error)

        found = []
        for index in mapper(own_or_smallest, range(len(ladders))):  # in order, as each ends
            found.append(index)
            advance()
        choices = [None if i is None else ladder[i] for ladder, i in zip(ladders, found)]
        for j, answer in own.items():
            choices[j] = answer if isinstance(answer, tuple) else None
        bound = rel_error
    else:

        def levels(function: Callable[[int], int], slots: Iterable[int]) -> list[int]:
            done = list(mapper(function, slots))
            advance()
            return done

        indices, setting = allocate(draft, ladders, level, 0.0, 1.0, levels)
        choices = [ladder[i] for ladder, i in zip(ladders, indices)]
        found = indices
        bound = 1.0 - setting
    reasons, layers = [], []
    for j, (slot, i) in enumerate(zip(draft.slots, found)):
        if j in own:
            answer = own[j]
            if isinstance(answer, str):
                reasons.append(f"error: kept whole; {answer}")
                layers.append({"layer": slot.layer.name, "ranks": None})
            else:
                reasons.append(
                    f"error: {slot.method.name} ranks {list(answer)} chosen by the method within "
                    f"relative error {rel_error:g}"
                )
                layers.append({"layer": slot.layer.name, "ranks": list(answer)})
            continue
        if i is None:
            reasons.append(
                f"error: kept whole; even its largest candidate has relative error "
                f"{error(j, len(ladders[j]) - 1):.3f} > {rel_error:g}"
            )
            layers.append({"layer": slot.layer.name, "ranks": None})
            continue
        where = f"for {budget.reduction:g}× {budget.metric}" if budget else f"(≤ {rel_error:g})"
        reasons.append(f"error: relative reconstruction error {error(j, i):.3f} {where}")
        layers.append(
            {"layer": slot.layer.name, "ranks": list(ladders[j][i]), "rel_error": error(j, i)}
        )
    report = {
        "selector": "error",
        "bound": float(bound),
        "decompositions": cache.misses,
        "cache_hits": cache.hits,
        "layers": layers,
    }
    return Choice(choices, reasons, report)
